//! Readers for the weight files the toolkit loads, in pure Rust and without Python:
//! BiT pretrained `.npz` archives ([`npz`]) and `torch.save` checkpoints ([`pickle`]),
//! both producing [`raw::RawTensor`]s. Neither reader panics or executes anything on
//! malformed or hostile input; every error names the file.

pub mod npz;
pub mod pickle;
pub mod raw;
