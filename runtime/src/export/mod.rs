//! Tools on trained Control Adapters (spec §11.3, §11.4): conversion to an additive PEFT
//! LoRA with a measured fidelity, and the per-layer spectral analysis.
pub mod analyze;
pub mod control_to_lora;
pub mod fidelity;
pub mod linalg;
