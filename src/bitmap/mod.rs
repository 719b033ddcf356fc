//! Bit sets for copy bitmaps, and dirty bitmaps kept in files beside the
//! image.

pub mod bits;
pub mod file;
pub mod qcow2;

pub use bits::Bits;
pub use file::{Bitmap, BitmapError, Identity};
