//! Firecracker's built-in CPU templates, `cpu_template` in `/machine-config`: C3, T2, T2S and
//! T2CL for Intel hosts, T2A for AMD ones. Each is a list of changes to CPUID registers and
//! MSRs, written here from named feature bits (Intel SDM vol. 2A, CPUID; AMD APM vol. 3,
//! appendix E; Intel's "CPUID Enumeration and Architectural MSRs" for IA32_ARCH_CAPABILITIES)
//! and turned into the `CpuTemplate` a custom template parses to, so both reach the vCPUs
//! the same way. The feature sets and the rules for using them are Firecracker's
//! (docs/cpu_templates/cpu-templates.md): the host's vendor, then its exact family, model and
//! stepping, must be one the template was made for.

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::cpu_template::CpuidRegister::{self, Eax, Ebx, Ecx, Edx};
use super::cpu_template::{Bits, CpuTemplate};

/// A built-in template's name as `/machine-config` takes and shows it. The variants are in
/// Firecracker's order, which serde's unknown-variant error lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StaticCpuTemplate {
    /// AWS C3 (Ivy Bridge) features; Intel Skylake, Cascade Lake and Ice Lake hosts.
    C3,
    /// AWS T2 (Haswell) features; Intel Skylake, Cascade Lake and Ice Lake hosts.
    T2,
    /// T2 with IA32_ARCH_CAPABILITIES fixed, for snapshots that move between Skylake and
    /// Cascade Lake hosts.
    T2S,
    /// No template (it clears one set before).
    None,
    /// T2 close to Cascade Lake, with AMD's T2A's instruction sets; Cascade Lake and Ice Lake.
    T2CL,
    /// T2CL's instruction sets on AMD Milan.
    T2A,
}

/// Why a built-in template cannot be used on this host; the texts are Firecracker's.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum StaticCpuTemplateError {
    /// The template is for the other vendor.
    #[error("CPU vendor mismatched between actual CPU and CPU template.")]
    CpuVendorMismatched,
    /// The template was not made for this CPU model.
    #[error("The current CPU model is not permitted to apply the CPU template.")]
    InvalidCpuModel,
}

const INTEL: &[u8; 12] = b"GenuineIntel";
const AMD: &[u8; 12] = b"AuthenticAMD";

/// The bits of CPUID.01H:EAX that make the CPU's signature (stepping 3:0, model 7:4, family
/// 11:8, extended model 19:16, extended family 27:20), as Firecracker compares them.
const SIGNATURE: u32 = 0x0fff_0fff;
/// Skylake-SP: family 6, model 0x55, stepping 4.
const SKYLAKE: u32 = 0x0005_0654;
/// Cascade Lake: family 6, model 0x55, stepping 7.
const CASCADE_LAKE: u32 = 0x0005_0657;
/// Ice Lake-SP: family 6, model 0x6a, stepping 6.
const ICE_LAKE: u32 = 0x0006_06a6;
/// Milan: family 0x19 (0xf + 0xa), model 0x01, stepping 1.
const MILAN: u32 = 0x00a0_0f11;

/// CPUID.01H:EAX, the version: the signature plus the processor type (13:12).
const VERSION: u32 = 0x0fff_3fff;
/// The version a T2 instance reports: Haswell-EP, family 6 model 0x3f stepping 2.
const T2_VERSION: u32 = 0x0003_06f2;
/// The version a C3 instance reports: Ivy Bridge-EP, family 6 model 0x3e stepping 4.
const C3_VERSION: u32 = 0x0003_06e4;

/// CPUID.01H:ECX.
mod leaf1_ecx {
    pub const DTES64: u32 = 1 << 2;
    pub const MONITOR: u32 = 1 << 3;
    pub const DS_CPL: u32 = 1 << 4;
    pub const VMX: u32 = 1 << 5;
    pub const SMX: u32 = 1 << 6;
    pub const EIST: u32 = 1 << 7;
    pub const TM2: u32 = 1 << 8;
    pub const CNXT_ID: u32 = 1 << 10;
    pub const SDBG: u32 = 1 << 11;
    pub const FMA: u32 = 1 << 12;
    pub const XTPR: u32 = 1 << 14;
    pub const PDCM: u32 = 1 << 15;
    pub const DCA: u32 = 1 << 18;
    pub const MOVBE: u32 = 1 << 22;
}

/// CPUID.01H:EDX.
mod leaf1_edx {
    pub const MCE: u32 = 1 << 7;
    pub const MTRR: u32 = 1 << 12;
    pub const PSN: u32 = 1 << 18;
    pub const DS: u32 = 1 << 21;
    pub const ACPI: u32 = 1 << 22;
    pub const SS: u32 = 1 << 27;
    pub const TM: u32 = 1 << 29;
    /// IA-64, long gone; reserved on AMD.
    pub const IA64: u32 = 1 << 30;
    pub const PBE: u32 = 1 << 31;
}

/// CPUID.(EAX=07H,ECX=0):EBX.
mod leaf7_ebx {
    pub const SGX: u32 = 1 << 2;
    pub const BMI1: u32 = 1 << 3;
    pub const HLE: u32 = 1 << 4;
    pub const AVX2: u32 = 1 << 5;
    pub const BMI2: u32 = 1 << 8;
    /// Enhanced REP MOVSB/STOSB.
    pub const ERMS: u32 = 1 << 9;
    pub const INVPCID: u32 = 1 << 10;
    pub const RTM: u32 = 1 << 11;
    /// RDT monitoring (AMD: PQM).
    pub const RDT_M: u32 = 1 << 12;
    pub const MPX: u32 = 1 << 14;
    /// RDT allocation (AMD: PQE).
    pub const RDT_A: u32 = 1 << 15;
    pub const AVX512F: u32 = 1 << 16;
    pub const AVX512DQ: u32 = 1 << 17;
    pub const RDSEED: u32 = 1 << 18;
    pub const ADX: u32 = 1 << 19;
    pub const AVX512_IFMA: u32 = 1 << 21;
    /// PCOMMIT on old Intel parts (withdrawn); RDPID in AMD's APM.
    pub const PCOMMIT: u32 = 1 << 22;
    pub const CLFLUSHOPT: u32 = 1 << 23;
    pub const CLWB: u32 = 1 << 24;
    /// Intel Processor Trace.
    pub const PT: u32 = 1 << 25;
    pub const AVX512PF: u32 = 1 << 26;
    pub const AVX512ER: u32 = 1 << 27;
    pub const AVX512CD: u32 = 1 << 28;
    pub const SHA: u32 = 1 << 29;
    pub const AVX512BW: u32 = 1 << 30;
    pub const AVX512VL: u32 = 1 << 31;
}

/// CPUID.(EAX=07H,ECX=0):ECX.
mod leaf7_ecx {
    pub const AVX512_VBMI: u32 = 1 << 1;
    pub const UMIP: u32 = 1 << 2;
    pub const PKU: u32 = 1 << 3;
    pub const OSPKE: u32 = 1 << 4;
    pub const AVX512_VBMI2: u32 = 1 << 6;
    pub const GFNI: u32 = 1 << 8;
    pub const VAES: u32 = 1 << 9;
    pub const VPCLMULQDQ: u32 = 1 << 10;
    pub const AVX512_VNNI: u32 = 1 << 11;
    pub const AVX512_BITALG: u32 = 1 << 12;
    pub const AVX512_VPOPCNTDQ: u32 = 1 << 14;
    pub const LA57: u32 = 1 << 16;
    pub const RDPID: u32 = 1 << 22;
    pub const SGX_LC: u32 = 1 << 30;
}

/// CPUID.(EAX=07H,ECX=0):EDX.
mod leaf7_edx {
    pub const AVX512_4VNNIW: u32 = 1 << 2;
    pub const AVX512_4FMAPS: u32 = 1 << 3;
    /// Fast short REP MOV.
    pub const FSRM: u32 = 1 << 4;
    pub const AVX512_VP2INTERSECT: u32 = 1 << 8;
}

/// CPUID.(EAX=0DH,ECX=0):EAX, the XSAVE state components XCR0 may enable.
mod xsave_xcr0 {
    /// MPX: BNDREGS and BNDCSR.
    pub const MPX: u32 = 0b11 << 3;
    /// AVX-512: opmask, ZMM_Hi256, Hi16_ZMM.
    pub const AVX512: u32 = 0b111 << 5;
    pub const PKRU: u32 = 1 << 9;
}

/// CPUID.(EAX=0DH,ECX=1):EAX.
mod xsave_features {
    pub const XSAVEC: u32 = 1 << 1;
    /// XGETBV with ECX = 1.
    pub const XGETBV_ECX1: u32 = 1 << 2;
    /// XSAVES/XRSTORS and IA32_XSS.
    pub const XSAVES: u32 = 1 << 3;
}

/// CPUID.80000001H:ECX.
mod ext1_ecx {
    /// AMD only.
    pub const SVM: u32 = 1 << 2;
    /// LZCNT (AMD: ABM).
    pub const LZCNT: u32 = 1 << 5;
    /// AMD only.
    pub const SSE4A: u32 = 1 << 6;
    /// AMD only.
    pub const MISALIGN_SSE: u32 = 1 << 7;
    /// PREFETCHW (AMD: 3DNowPrefetch).
    pub const PREFETCHW: u32 = 1 << 8;
    /// MONITORX/MWAITX.
    pub const MWAITX: u32 = 1 << 29;
}

/// CPUID.80000001H:EDX.
mod ext1_edx {
    /// AMD only, as are the next three.
    pub const MMX_EXT: u32 = 1 << 22;
    pub const MMX: u32 = 1 << 23;
    pub const FXSR: u32 = 1 << 24;
    pub const FFXSR: u32 = 1 << 25;
    /// 1-GByte pages.
    pub const PAGE_1GB: u32 = 1 << 26;
}

/// CPUID.80000008H:EBX.
mod ext8_ebx {
    /// AMD only, as are all but WBNOINVD.
    pub const CLZERO: u32 = 1 << 0;
    /// FXSAVE/XSAVE always save the x87 error pointers.
    pub const RSTR_FP_ERR_PTRS: u32 = 1 << 2;
    pub const WBNOINVD: u32 = 1 << 9;
    pub const IBRS_PREFERRED: u32 = 1 << 18;
    pub const IBRS_SAME_MODE: u32 = 1 << 19;
    pub const EFER_LMSLE_UNSUPPORTED: u32 = 1 << 20;
}

/// IA32_ARCH_CAPABILITIES (MSR 0x10a), Intel only.
mod arch_caps {
    pub const MSR: u32 = 0x10a;
    pub const RDCL_NO: u64 = 1 << 0;
    pub const IBRS_ALL: u64 = 1 << 1;
    pub const RSBA: u64 = 1 << 2;
    pub const SKIP_L1DFL_VMENTRY: u64 = 1 << 3;
    pub const SSB_NO: u64 = 1 << 4;
    pub const MDS_NO: u64 = 1 << 5;
    pub const IF_PSCHANGE_MC_NO: u64 = 1 << 6;
    pub const TSX_CTRL: u64 = 1 << 7;
    pub const TAA_NO: u64 = 1 << 8;
    pub const MISC_PACKAGE_CTLS: u64 = 1 << 10;
    pub const ENERGY_FILTERING_CTL: u64 = 1 << 11;
    pub const SBDR_SSDP_NO: u64 = 1 << 13;
    pub const FBSDP_NO: u64 = 1 << 14;
    pub const PSDP_NO: u64 = 1 << 15;
    pub const FB_CLEAR: u64 = 1 << 17;
    pub const RRSBA: u64 = 1 << 19;
    pub const PBRSB_NO: u64 = 1 << 24;
    pub const GDS_NO: u64 = 1 << 26;
    pub const RFDS_NO: u64 = 1 << 27;
    pub const RFDS_CLEAR: u64 = 1 << 28;
    /// The vulnerability and mitigation bits KVM passes through to a guest (arch/x86/kvm/x86.c,
    /// KVM_SUPPORTED_ARCH_CAP): T2CL keeps these as the host has them and clears the rest.
    pub const KVM_PASSED_THROUGH: u64 = RDCL_NO
        | IBRS_ALL
        | RSBA
        | SKIP_L1DFL_VMENTRY
        | SSB_NO
        | MDS_NO
        | IF_PSCHANGE_MC_NO
        | TSX_CTRL
        | TAA_NO
        | SBDR_SSDP_NO
        | FBSDP_NO
        | PSDP_NO
        | FB_CLEAR
        | RRSBA
        | PBRSB_NO
        | GDS_NO
        | RFDS_NO
        | RFDS_CLEAR;
    /// What T2S tells every guest, whatever the host: the value a Skylake host (the more
    /// vulnerable of the two it migrates between) has, so the guest mitigates as it would
    /// need to there.
    pub const T2S: u64 = RSBA
        | SKIP_L1DFL_VMENTRY
        | IF_PSCHANGE_MC_NO
        | MISC_PACKAGE_CTLS
        | ENERGY_FILTERING_CTL
        | RRSBA
        | GDS_NO
        | RFDS_NO;
}

/// One CPUID register change: the bits of `clear` become 0, those of `set` 1.
#[derive(Debug, Clone, Copy)]
struct CpuidChange {
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    clear: u32,
    set: u32,
}

const fn clear(leaf: u32, subleaf: u32, register: CpuidRegister, bits: u32) -> CpuidChange {
    CpuidChange {
        leaf,
        subleaf,
        register,
        clear: bits,
        set: 0,
    }
}

/// `field` of the register becomes `value`.
const fn replace(
    leaf: u32,
    subleaf: u32,
    register: CpuidRegister,
    field: u32,
    value: u32,
) -> CpuidChange {
    CpuidChange {
        leaf,
        subleaf,
        register,
        clear: field & !value,
        set: value,
    }
}

/// The T2 family's CPUID changes to the standard leaves, which T2, T2S, T2CL and T2A share.
const T2_STANDARD: &[CpuidChange] = {
    use {leaf1_ecx as c1, leaf1_edx as d1, leaf7_ebx as b7, leaf7_ecx as c7, leaf7_edx as d7};
    &[
        replace(0x1, 0, Eax, VERSION, T2_VERSION),
        clear(
            0x1,
            0,
            Ecx,
            c1::DTES64
                | c1::MONITOR
                | c1::DS_CPL
                | c1::VMX
                | c1::SMX
                | c1::EIST
                | c1::TM2
                | c1::CNXT_ID
                | c1::SDBG
                | c1::XTPR
                | c1::PDCM
                | c1::DCA,
        ),
        clear(
            0x1,
            0,
            Edx,
            d1::PSN | d1::DS | d1::ACPI | d1::SS | d1::TM | d1::IA64 | d1::PBE,
        ),
        replace(0x1, 0, Edx, d1::MCE | d1::MTRR, d1::MCE | d1::MTRR),
        clear(
            0x7,
            0,
            Ebx,
            b7::SGX
                | b7::HLE
                | b7::RTM
                | b7::RDT_M
                | b7::MPX
                | b7::RDT_A
                | b7::AVX512F
                | b7::AVX512DQ
                | b7::RDSEED
                | b7::ADX
                | b7::AVX512_IFMA
                | b7::PCOMMIT
                | b7::CLFLUSHOPT
                | b7::CLWB
                | b7::PT
                | b7::AVX512PF
                | b7::AVX512ER
                | b7::AVX512CD
                | b7::SHA
                | b7::AVX512BW
                | b7::AVX512VL,
        ),
        replace(0x7, 0, Ebx, b7::ERMS, b7::ERMS),
        clear(
            0x7,
            0,
            Ecx,
            c7::AVX512_VBMI
                | c7::UMIP
                | c7::PKU
                | c7::OSPKE
                | c7::AVX512_VBMI2
                | c7::GFNI
                | c7::VAES
                | c7::VPCLMULQDQ
                | c7::AVX512_VNNI
                | c7::AVX512_BITALG
                | c7::AVX512_VPOPCNTDQ
                | c7::LA57
                | c7::RDPID
                | c7::SGX_LC,
        ),
        clear(
            0x7,
            0,
            Edx,
            d7::AVX512_4VNNIW | d7::AVX512_4FMAPS | d7::FSRM | d7::AVX512_VP2INTERSECT,
        ),
        clear(
            0xd,
            0,
            Eax,
            xsave_xcr0::MPX | xsave_xcr0::AVX512 | xsave_xcr0::PKRU,
        ),
        clear(
            0xd,
            1,
            Eax,
            xsave_features::XSAVEC | xsave_features::XGETBV_ECX1 | xsave_features::XSAVES,
        ),
        clear(0x8000_0008, 0, Ebx, ext8_ebx::WBNOINVD),
    ]
};

/// T2's and T2S's extended leaf 0x80000001.
const T2_EXTENDED: &[CpuidChange] = &[
    clear(0x8000_0001, 0, Ecx, ext1_ecx::PREFETCHW | ext1_ecx::MWAITX),
    clear(0x8000_0001, 0, Edx, ext1_edx::PAGE_1GB),
];

/// T2CL's: T2's, and the AMD-only bits T2A clears, so both show the same instruction sets.
const T2CL_EXTENDED: &[CpuidChange] = &[
    clear(
        0x8000_0001,
        0,
        Ecx,
        ext1_ecx::SSE4A | ext1_ecx::MISALIGN_SSE | ext1_ecx::PREFETCHW | ext1_ecx::MWAITX,
    ),
    clear(
        0x8000_0001,
        0,
        Edx,
        ext1_edx::MMX_EXT | ext1_edx::MMX | ext1_edx::FXSR | ext1_edx::FFXSR | ext1_edx::PAGE_1GB,
    ),
];

/// T2A's: Milan's extras off (MMX and FXSR stay: Intel has them in leaf 1), and the
/// 0x80000008 bits that tell the guest what the CPU does for Spectre and the x87 pointers.
const T2A_EXTENDED: &[CpuidChange] = &[
    clear(
        0x8000_0001,
        0,
        Ecx,
        ext1_ecx::SVM
            | ext1_ecx::SSE4A
            | ext1_ecx::MISALIGN_SSE
            | ext1_ecx::PREFETCHW
            | ext1_ecx::MWAITX,
    ),
    clear(
        0x8000_0001,
        0,
        Edx,
        ext1_edx::MMX_EXT | ext1_edx::FFXSR | ext1_edx::PAGE_1GB,
    ),
    clear(0x8000_0008, 0, Ebx, ext8_ebx::CLZERO),
    replace(
        0x8000_0008,
        0,
        Ebx,
        ext8_ebx::RSTR_FP_ERR_PTRS
            | ext8_ebx::IBRS_PREFERRED
            | ext8_ebx::IBRS_SAME_MODE
            | ext8_ebx::EFER_LMSLE_UNSUPPORTED,
        ext8_ebx::RSTR_FP_ERR_PTRS
            | ext8_ebx::IBRS_PREFERRED
            | ext8_ebx::IBRS_SAME_MODE
            | ext8_ebx::EFER_LMSLE_UNSUPPORTED,
    ),
];

/// C3: Ivy Bridge's features, so fewer than T2 (no AVX2, BMI, FMA, MOVBE, LZCNT...).
const C3_CPUID: &[CpuidChange] = {
    use {leaf1_ecx as c1, leaf1_edx as d1, leaf7_ebx as b7, leaf7_ecx as c7, leaf7_edx as d7};
    &[
        replace(0x1, 0, Eax, VERSION, C3_VERSION),
        clear(
            0x1,
            0,
            Ecx,
            c1::DTES64
                | c1::MONITOR
                | c1::DS_CPL
                | c1::VMX
                | c1::TM2
                | c1::CNXT_ID
                | c1::SDBG
                | c1::FMA
                | c1::XTPR
                | c1::PDCM
                | c1::MOVBE,
        ),
        clear(
            0x1,
            0,
            Edx,
            d1::PSN | d1::DS | d1::ACPI | d1::SS | d1::TM | d1::PBE,
        ),
        replace(0x1, 0, Edx, d1::MCE | d1::MTRR, d1::MCE | d1::MTRR),
        clear(
            0x7,
            0,
            Ebx,
            b7::SGX
                | b7::BMI1
                | b7::HLE
                | b7::AVX2
                | b7::BMI2
                | b7::INVPCID
                | b7::RTM
                | b7::RDT_M
                | b7::MPX
                | b7::RDT_A
                | b7::AVX512F
                | b7::AVX512DQ
                | b7::RDSEED
                | b7::ADX
                | b7::AVX512_IFMA
                | b7::CLFLUSHOPT
                | b7::CLWB
                | b7::PT
                | b7::AVX512PF
                | b7::AVX512ER
                | b7::AVX512CD
                | b7::SHA
                | b7::AVX512BW
                | b7::AVX512VL,
        ),
        clear(
            0x7,
            0,
            Ecx,
            c7::AVX512_VBMI
                | c7::UMIP
                | c7::PKU
                | c7::OSPKE
                | c7::AVX512_VNNI
                | c7::AVX512_VPOPCNTDQ
                | c7::LA57
                | c7::RDPID
                | c7::SGX_LC,
        ),
        clear(0x7, 0, Edx, d7::AVX512_4VNNIW | d7::AVX512_4FMAPS),
        clear(
            0xd,
            0,
            Eax,
            xsave_xcr0::MPX | xsave_xcr0::AVX512 | xsave_xcr0::PKRU,
        ),
        clear(
            0xd,
            1,
            Eax,
            xsave_features::XSAVEC | xsave_features::XGETBV_ECX1 | xsave_features::XSAVES,
        ),
        clear(0x8000_0001, 0, Ecx, ext1_ecx::LZCNT | ext1_ecx::PREFETCHW),
        clear(0x8000_0001, 0, Edx, ext1_edx::PAGE_1GB),
    ]
};

impl StaticCpuTemplate {
    /// The vendor and the CPU signatures (CPUID.01H:EAX under `SIGNATURE`) it is made for;
    /// none for `None`.
    fn hosts(self) -> Option<(&'static [u8; 12], &'static [u32])> {
        match self {
            Self::C3 | Self::T2 => Some((INTEL, &[SKYLAKE, CASCADE_LAKE, ICE_LAKE])),
            Self::T2S => Some((INTEL, &[SKYLAKE, CASCADE_LAKE])),
            Self::T2CL => Some((INTEL, &[CASCADE_LAKE, ICE_LAKE])),
            Self::T2A => Some((AMD, &[MILAN])),
            Self::None => None,
        }
    }

    /// CPUID changes, in order, and MSR changes as (MSR, bits to clear, bits to set).
    fn changes(self) -> (Vec<CpuidChange>, Vec<(u32, u64, u64)>) {
        let (cpuid, msrs): (&[&[CpuidChange]], _) = match self {
            Self::None => (&[], vec![]),
            Self::C3 => (&[C3_CPUID], vec![]),
            Self::T2 => (&[T2_STANDARD, T2_EXTENDED], vec![]),
            // Every bit of IA32_ARCH_CAPABILITIES is fixed.
            Self::T2S => (
                &[T2_STANDARD, T2_EXTENDED],
                vec![(arch_caps::MSR, !arch_caps::T2S, arch_caps::T2S)],
            ),
            Self::T2CL => (
                &[T2_STANDARD, T2CL_EXTENDED],
                vec![(arch_caps::MSR, !arch_caps::KVM_PASSED_THROUGH, 0)],
            ),
            Self::T2A => (&[T2_STANDARD, T2A_EXTENDED], vec![]),
        };
        (cpuid.concat(), msrs)
    }

    /// The template's changes, ready for the vCPUs; empty for `None`.
    pub fn template(self) -> CpuTemplate {
        let (cpuid, msrs) = self.changes();
        CpuTemplate {
            cpuid: cpuid
                .into_iter()
                .map(|c| {
                    let bits = Bits {
                        mask: u64::from(c.clear | c.set),
                        value: u64::from(c.set),
                    };
                    (c.leaf, c.subleaf, c.register, bits)
                })
                .collect(),
            msrs: msrs
                .into_iter()
                .map(|(msr, clear, set)| {
                    let bits = Bits {
                        mask: clear | set,
                        value: set,
                    };
                    (msr, bits)
                })
                .collect(),
        }
    }

    /// The template for a host whose CPUID.0 vendor is `vendor` and CPUID.01H:EAX is `eax`,
    /// refused as Firecracker refuses it: first on the vendor, then on the model.
    pub fn template_for(
        self,
        vendor: &[u8; 12],
        eax: u32,
    ) -> Result<CpuTemplate, StaticCpuTemplateError> {
        let Some((wanted, signatures)) = self.hosts() else {
            return Ok(CpuTemplate::default());
        };
        if vendor != wanted {
            return Err(StaticCpuTemplateError::CpuVendorMismatched);
        }
        if !signatures.contains(&(eax & SIGNATURE)) {
            return Err(StaticCpuTemplateError::InvalidCpuModel);
        }
        if self == Self::C3 && eax & SIGNATURE == SKYLAKE {
            log::warn!(
                "On processors that do not enumerate FBSDP_NO, PSDP_NO and SBDR_SSDP_NO on \
                 IA32_ARCH_CAPABILITIES MSR, the guest kernel does not apply the mitigation \
                 against MMIO stale data vulnerability."
            );
        }
        Ok(self.template())
    }

    /// The template for this host's CPU.
    pub fn template_for_host(self) -> Result<CpuTemplate, StaticCpuTemplateError> {
        // Leaves 0 and 1 exist on every x86-64 CPU.
        let (l0, l1) = (std::arch::x86_64::__cpuid(0), std::arch::x86_64::__cpuid(1));
        let mut vendor = [0u8; 12];
        for (chunk, reg) in vendor.chunks_exact_mut(4).zip([l0.ebx, l0.edx, l0.ecx]) {
            chunk.copy_from_slice(&reg.to_le_bytes());
        }
        self.template_for(&vendor, l1.eax)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    const BUILT_IN: [StaticCpuTemplate; 5] = [
        StaticCpuTemplate::C3,
        StaticCpuTemplate::T2,
        StaticCpuTemplate::T2S,
        StaticCpuTemplate::T2CL,
        StaticCpuTemplate::T2A,
    ];

    /// (leaf, subleaf, register).
    type Register = (u32, u32, &'static str);
    /// (bits cleared, bits set).
    type Change = (u32, u32);

    /// Each register's bits cleared and set once every change is applied.
    fn net(t: StaticCpuTemplate) -> BTreeMap<Register, Change> {
        let mut out = BTreeMap::new();
        for c in t.changes().0 {
            let name = match c.register {
                Eax => "eax",
                Ebx => "ebx",
                Ecx => "ecx",
                Edx => "edx",
            };
            let (cleared, set) = out.entry((c.leaf, c.subleaf, name)).or_insert((0, 0));
            *cleared = (*cleared & !c.set) | c.clear;
            *set = (*set & !c.clear) | c.set;
        }
        out
    }

    fn cleared(t: StaticCpuTemplate, leaf: u32, subleaf: u32, reg: &'static str) -> u32 {
        net(t).get(&(leaf, subleaf, reg)).map_or(0, |r| r.0)
    }

    fn set(t: StaticCpuTemplate, leaf: u32, subleaf: u32, reg: &'static str) -> u32 {
        net(t).get(&(leaf, subleaf, reg)).map_or(0, |r| r.1)
    }

    /// Every register the templates touch, its bits cleared and set, as Firecracker 1.16.1's
    /// templates (tests/data/custom_cpu_templates/*.json there) have them.
    #[test]
    fn each_template_is_firecrackers_bit_for_bit() {
        let t2_standard = [
            ((0x1, 0, "eax"), (0x0ffc_390d, 0x0003_06f2)),
            ((0x1, 0, "ecx"), (0x0004_cdfc, 0)),
            ((0x1, 0, "edx"), (0xe864_0000, 0x0000_1080)),
            ((0x7, 0, "ebx"), (0xffef_d814, 0x0000_0200)),
            ((0x7, 0, "ecx"), (0x4041_5f5e, 0)),
            ((0x7, 0, "edx"), (0x0000_011c, 0)),
            ((0xd, 0, "eax"), (0x0000_02f8, 0)),
            ((0xd, 1, "eax"), (0x0000_000e, 0)),
        ];
        let with = |extra: &[(Register, Change)]| {
            t2_standard
                .iter()
                .chain(extra)
                .copied()
                .collect::<BTreeMap<_, _>>()
        };
        let t2 = with(&[
            ((0x8000_0001, 0, "ecx"), (0x2000_0100, 0)),
            ((0x8000_0001, 0, "edx"), (0x0400_0000, 0)),
            ((0x8000_0008, 0, "ebx"), (0x0000_0200, 0)),
        ]);
        assert_eq!(net(StaticCpuTemplate::T2), t2);
        assert_eq!(net(StaticCpuTemplate::T2S), t2);
        assert_eq!(
            net(StaticCpuTemplate::T2CL),
            with(&[
                ((0x8000_0001, 0, "ecx"), (0x2000_01c0, 0)),
                ((0x8000_0001, 0, "edx"), (0x07c0_0000, 0)),
                ((0x8000_0008, 0, "ebx"), (0x0000_0200, 0)),
            ])
        );
        assert_eq!(
            net(StaticCpuTemplate::T2A),
            with(&[
                ((0x8000_0001, 0, "ecx"), (0x2000_01c4, 0)),
                ((0x8000_0001, 0, "edx"), (0x0640_0000, 0)),
                ((0x8000_0008, 0, "ebx"), (0x0000_0201, 0x001c_0004)),
            ])
        );
        let c3: BTreeMap<_, _> = [
            ((0x1, 0, "eax"), (0x0ffc_391b, 0x0003_06e4)),
            ((0x1, 0, "ecx"), (0x0040_dd3c, 0)),
            ((0x1, 0, "edx"), (0xa864_0000, 0x0000_1080)),
            ((0x7, 0, "ebx"), (0xffaf_dd3c, 0)),
            ((0x7, 0, "ecx"), (0x4041_481e, 0)),
            ((0x7, 0, "edx"), (0x0000_000c, 0)),
            ((0xd, 0, "eax"), (0x0000_02f8, 0)),
            ((0xd, 1, "eax"), (0x0000_000e, 0)),
            ((0x8000_0001, 0, "ecx"), (0x0000_0120, 0)),
            ((0x8000_0001, 0, "edx"), (0x0400_0000, 0)),
        ]
        .into_iter()
        .collect();
        assert_eq!(net(StaticCpuTemplate::C3), c3);

        let msrs = |t: StaticCpuTemplate| t.template().msrs;
        assert_eq!(
            msrs(StaticCpuTemplate::T2S),
            vec![(
                0x10a,
                Bits {
                    mask: u64::MAX,
                    value: 0x0c08_0c4c
                }
            )]
        );
        assert_eq!(
            msrs(StaticCpuTemplate::T2CL),
            vec![(
                0x10a,
                Bits {
                    mask: 0xffff_ffff_e2f5_1e00,
                    value: 0
                }
            )]
        );
        for t in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2A,
        ] {
            assert!(msrs(t).is_empty(), "{t:?}");
        }
        assert_eq!(StaticCpuTemplate::None.template(), CpuTemplate::default());
    }

    /// The features the documentation names, by name.
    #[test]
    fn the_templates_hide_what_the_documentation_says() {
        use StaticCpuTemplate::{C3, T2, T2A, T2CL, T2S};
        for t in BUILT_IN {
            // No AVX-512 in any of them: not its instructions, nor its XSAVE state.
            assert_eq!(
                cleared(t, 7, 0, "ebx") & leaf7_ebx::AVX512F,
                leaf7_ebx::AVX512F,
                "{t:?}"
            );
            assert_ne!(cleared(t, 0xd, 0, "eax") & xsave_xcr0::AVX512, 0, "{t:?}");
            // No nested virtualisation, no SGX, no 1 GiB pages; MCE and MTRR always shown.
            assert_ne!(cleared(t, 1, 0, "ecx") & leaf1_ecx::VMX, 0, "{t:?}");
            assert_ne!(cleared(t, 7, 0, "ebx") & leaf7_ebx::SGX, 0, "{t:?}");
            assert_ne!(
                cleared(t, 0x8000_0001, 0, "edx") & ext1_edx::PAGE_1GB,
                0,
                "{t:?}"
            );
            assert_eq!(
                set(t, 1, 0, "edx"),
                leaf1_edx::MCE | leaf1_edx::MTRR,
                "{t:?}"
            );
            // A bit is never both cleared and set.
            for (key, (c, s)) in net(t) {
                assert_eq!(c & s, 0, "{t:?} {key:?}");
            }
        }
        // C3 is an Ivy Bridge: no AVX2, FMA, BMI; T2 is a Haswell, which has them.
        for bit in [leaf7_ebx::AVX2, leaf7_ebx::BMI1, leaf7_ebx::BMI2] {
            assert_ne!(cleared(C3, 7, 0, "ebx") & bit, 0);
            assert_eq!(cleared(T2, 7, 0, "ebx") & bit, 0);
        }
        assert_ne!(cleared(C3, 1, 0, "ecx") & leaf1_ecx::FMA, 0);
        assert_eq!(set(C3, 1, 0, "eax"), C3_VERSION);
        assert_eq!(set(T2, 1, 0, "eax"), T2_VERSION);
        // T2CL and T2A show the same instruction sets in the extended leaf: T2CL clears the
        // AMD-only bits an Intel CPU would not set anyway, T2A the ones a Milan would.
        let ext = |t, reg| cleared(t, 0x8000_0001, 0, reg);
        assert_eq!(
            ext(T2CL, "ecx") & !ext1_ecx::SVM,
            ext(T2A, "ecx") & !ext1_ecx::SVM
        );
        assert_eq!(
            ext(T2A, "edx") & (ext1_edx::MMX | ext1_edx::FXSR),
            0,
            "Milan's MMX and FXSR stay"
        );
        // T2S fixes IA32_ARCH_CAPABILITIES; T2CL passes KVM's mitigation bits through.
        let arch = |t: StaticCpuTemplate| t.template().msrs;
        assert_eq!(arch(T2S)[0].1.apply(u64::MAX), arch_caps::T2S);
        assert_eq!(
            arch(T2CL)[0].1.apply(u64::MAX),
            arch_caps::KVM_PASSED_THROUGH
        );
        assert_ne!(arch_caps::KVM_PASSED_THROUGH & arch_caps::MDS_NO, 0);
    }

    /// Vendor first, then the exact model, with Firecracker's texts.
    #[test]
    fn a_template_is_only_for_the_hosts_it_was_made_for() {
        use StaticCpuTemplateError::{CpuVendorMismatched, InvalidCpuModel};
        let cascade_lake = CASCADE_LAKE | 0x3000; // processor-type bits do not count
        for t in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2S,
        ] {
            assert_eq!(t.template_for(INTEL, cascade_lake), Ok(t.template()));
            assert_eq!(t.template_for(AMD, MILAN), Err(CpuVendorMismatched));
        }
        assert_eq!(
            StaticCpuTemplate::T2S.template_for(INTEL, ICE_LAKE),
            Err(InvalidCpuModel)
        );
        assert_eq!(
            StaticCpuTemplate::T2CL.template_for(INTEL, SKYLAKE),
            Err(InvalidCpuModel)
        );
        // Sapphire Rapids (family 6, model 0x8f) is too new for any of them.
        for t in [
            StaticCpuTemplate::C3,
            StaticCpuTemplate::T2,
            StaticCpuTemplate::T2CL,
        ] {
            assert_eq!(t.template_for(INTEL, 0x000806f8), Err(InvalidCpuModel));
        }
        assert!(StaticCpuTemplate::T2A.template_for(AMD, MILAN).is_ok());
        // Genoa: family 0x19, model 0x11.
        assert_eq!(
            StaticCpuTemplate::T2A.template_for(AMD, 0x00a1_0f11),
            Err(InvalidCpuModel)
        );
        assert_eq!(
            StaticCpuTemplate::T2A.template_for(INTEL, CASCADE_LAKE),
            Err(CpuVendorMismatched)
        );
        assert_eq!(
            StaticCpuTemplate::None.template_for(b"HygonGenuine", 0),
            Ok(CpuTemplate::default())
        );
        assert_eq!(
            CpuVendorMismatched.to_string(),
            "CPU vendor mismatched between actual CPU and CPU template."
        );
    }

    #[test]
    fn names_are_firecrackers() {
        let names: Vec<String> = BUILT_IN
            .iter()
            .map(|t| serde_json::to_string(t).unwrap())
            .collect();
        assert_eq!(
            names,
            [r#""C3""#, r#""T2""#, r#""T2S""#, r#""T2CL""#, r#""T2A""#]
        );
        let err = serde_json::from_str::<StaticCpuTemplate>(r#""V1N1""#).unwrap_err();
        assert!(
            err.to_string().starts_with(
                "unknown variant `V1N1`, expected one of `C3`, `T2`, `T2S`, `None`, `T2CL`, `T2A`"
            ),
            "{err}"
        );
    }
}
