//! Comparing two images byte for byte (`--verify` with a guest or without a
//! manifest, `verify --against-image`): the one home of that comparison.

use crate::copy::CopyError;
use crate::job::JobError;
use crate::job::cancel::Cancel;
use crate::node::BlockNode;

/// Compare `got` with `want` over their whole size; the first differing
/// offset, if any. Stops early (`Ok(None)`) when `cancel` is set: callers
/// check it. A read error of `got` is a step error, of `want` a source
/// read error.
pub fn first_difference(
    got: &dyn BlockNode,
    want: &dyn BlockNode,
    cancel: &Cancel,
) -> Result<Option<u64>, JobError> {
    if got.size() != want.size() {
        return Ok(Some(got.size().min(want.size())));
    }
    let size = want.size();
    let chunk = 4u64 << 20;
    let (mut a, mut b) = (vec![0u8; chunk as usize], vec![0u8; chunk as usize]);
    let mut pos = 0;
    while pos < size {
        if cancel.is_cancelled() {
            return Ok(None);
        }
        let n = (size - pos).min(chunk) as usize;
        got.read(pos, &mut a[..n])
            .map_err(JobError::context("cannot read the backup"))?;
        want.read(pos, &mut b[..n]).map_err(CopyError::Source)?;
        if a[..n] != b[..n] {
            let i = a[..n]
                .iter()
                .zip(&b[..n])
                .position(|(x, y)| x != y)
                .unwrap_or(0);
            return Ok(Some(pos + i as u64));
        }
        pos += n as u64;
    }
    Ok(None)
}
