//! The x86_64 guest ABI: address layout, boot protocols, CPUID, MSRs, registers, MP table.

pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod layout;
pub mod mptable;
pub mod msr;
pub mod regs;
pub mod static_cpu_template;
