pub mod compile;
pub mod data;
pub mod generate;
pub mod inspect;
pub mod run;
pub mod score;
pub mod analyze;
pub mod export;
