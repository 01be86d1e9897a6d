//! `RopeBackward`: rotary embedding's vector-Jacobian product — the inverse rotation, built
//! from exactly the forward's angles (see `rope::rotate`).
use crate::backend::KernelError;
use crate::HostTensor;
use qplc_ops::Rope;

pub(crate) fn rope_backward(
    rope: &Rope,
    g: &HostTensor,
    pos: &HostTensor,
    out: &mut HostTensor,
) -> Result<(), KernelError> {
    super::rope::rotate("rope_backward", rope, g, pos, out, true)
}
