//! Bit sets for copy bitmaps, and dirty bitmaps kept in files beside the
//! image.

pub mod bits;
pub mod file;
pub mod qcow2;

pub use bits::Bits;
pub use file::{Bitmap, BitmapError, Identity};

/// The bitmaps a process marks while it writes an image in place (`guest`,
/// `serve`), each with whether it was consistent when loaded.
pub type Tracked = std::sync::Arc<std::sync::Mutex<Vec<(Bitmap, bool)>>>;
