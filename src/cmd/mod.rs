pub mod compile;
pub mod inspect;
