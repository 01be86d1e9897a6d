pub mod compile;
pub mod generate;
pub mod inspect;
pub mod score;
