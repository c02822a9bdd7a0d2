pub mod capture;
pub mod stage;
