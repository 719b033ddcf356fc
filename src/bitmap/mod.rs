//! Bit sets for copy bitmaps and dirty bitmaps.

pub mod bits;

pub use bits::Bits;
