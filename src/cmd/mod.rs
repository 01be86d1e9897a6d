pub mod analyze;
pub mod compile;
pub mod data;
pub mod export;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod score;
