//! Type mapping per target, free of any client library so that `check` can
//! show it without connecting.

pub mod cast;
pub mod diff;
pub mod dump;
pub mod narrow;
pub mod postgres;
pub mod surreal;
