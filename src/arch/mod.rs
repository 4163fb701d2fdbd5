//! Architecture-specific guest set-up. Skiff supports x86_64 only.

pub mod x86_64;
