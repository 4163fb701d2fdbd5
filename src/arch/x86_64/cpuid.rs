//! CPUID for each vCPU: KVM's supported set, normalised for topology and the hypervisor leaf,
//! with the features a PVM host cannot emulate taken out.

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

/// A feature bit in a CPUID register.
#[derive(Debug, Clone, Copy)]
struct Feature {
    name: &'static str,
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
    Eax,
}

const fn feature(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        name,
        leaf,
        subleaf,
        reg,
        bit,
    }
}

/// Features whose instructions the PVM host's emulator cannot run (measured: `lock cmpxchg16b`,
/// `popcnt`, `clac`/`stac` (SMAP), `xrstor`), or that its shadow paging cannot offer (SMEP,
/// PCID, INVPCID, FSGSBASE), and everything that depends on XSAVE.
const PVM_HIDDEN: &[Feature] = &[
    feature("cx16", 1, 0, Reg::Ecx, 13),
    feature("pcid", 1, 0, Reg::Ecx, 17),
    feature("popcnt", 1, 0, Reg::Ecx, 23),
    feature("xsave", 1, 0, Reg::Ecx, 26),
    feature("osxsave", 1, 0, Reg::Ecx, 27),
    feature("avx", 1, 0, Reg::Ecx, 28),
    feature("fma", 1, 0, Reg::Ecx, 12),
    feature("f16c", 1, 0, Reg::Ecx, 29),
    feature("fsgsbase", 7, 0, Reg::Ebx, 0),
    feature("avx2", 7, 0, Reg::Ebx, 5),
    feature("smep", 7, 0, Reg::Ebx, 7),
    feature("invpcid", 7, 0, Reg::Ebx, 10),
    feature("mpx", 7, 0, Reg::Ebx, 14),
    feature("avx512f", 7, 0, Reg::Ebx, 16),
    feature("avx512dq", 7, 0, Reg::Ebx, 17),
    feature("smap", 7, 0, Reg::Ebx, 20),
    feature("avx512ifma", 7, 0, Reg::Ebx, 21),
    feature("avx512pf", 7, 0, Reg::Ebx, 26),
    feature("avx512er", 7, 0, Reg::Ebx, 27),
    feature("avx512cd", 7, 0, Reg::Ebx, 28),
    feature("avx512bw", 7, 0, Reg::Ebx, 30),
    feature("avx512vl", 7, 0, Reg::Ebx, 31),
    feature("avx512vbmi", 7, 0, Reg::Ecx, 1),
    feature("pku", 7, 0, Reg::Ecx, 3),
    feature("ospke", 7, 0, Reg::Ecx, 4),
    feature("avx512vbmi2", 7, 0, Reg::Ecx, 6),
    feature("vaes", 7, 0, Reg::Ecx, 9),
    feature("vpclmulqdq", 7, 0, Reg::Ecx, 10),
    feature("avx512vnni", 7, 0, Reg::Ecx, 11),
    feature("avx512bitalg", 7, 0, Reg::Ecx, 12),
    feature("avx512vpopcntdq", 7, 0, Reg::Ecx, 14),
    feature("avx512_4vnniw", 7, 0, Reg::Edx, 2),
    feature("avx512_4fmaps", 7, 0, Reg::Edx, 3),
    feature("avx512_vp2intersect", 7, 0, Reg::Edx, 8),
    feature("avx512_fp16", 7, 0, Reg::Edx, 23),
    feature("amx_bf16", 7, 0, Reg::Edx, 22),
    feature("amx_tile", 7, 0, Reg::Edx, 24),
    feature("amx_int8", 7, 0, Reg::Edx, 25),
    feature("arch_capabilities", 7, 0, Reg::Edx, 29),
    feature("avx_vnni", 7, 1, Reg::Eax, 4),
    feature("avx512_bf16", 7, 1, Reg::Eax, 5),
    // KVM's paravirtual features that work by hypercall: the PVM host never completes one
    // (measured: a second vCPU sending its first IPI by KVM_HC_SEND_IPI re-executes the
    // hypercall instruction forever), so Linux must use the APIC and plain halts instead.
    feature("kvm_pv_unhalt", KVM_CPUID_FEATURES, 0, Reg::Eax, 7),
    feature("kvm_pv_send_ipi", KVM_CPUID_FEATURES, 0, Reg::Eax, 11),
    feature("kvm_pv_sched_yield", KVM_CPUID_FEATURES, 0, Reg::Eax, 13),
];

/// KVM's paravirtual feature leaf (Documentation/virt/kvm/x86/cpuid.rst).
const KVM_CPUID_FEATURES: u32 = 0x4000_0001;

/// CPUID leaf 1 ECX bit 31: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID leaf 1 EDX bit 28: the package has more than one logical processor.
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Extended topology level types (SDM vol. 2A, CPUID leaf 0BH).
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

fn reg_mut(entry: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut entry.eax,
        Reg::Ebx => &mut entry.ebx,
        Reg::Ecx => &mut entry.ecx,
        Reg::Edx => &mut entry.edx,
    }
}

/// Removes the features a PVM host cannot emulate from `cpuid` and returns the names of those
/// that were present. XSAVE's state leaf (0xd) is emptied with it.
pub fn hide_pvm_unsupported(cpuid: &mut CpuId) -> Vec<&'static str> {
    let mut hidden = Vec::new();
    for entry in cpuid.as_mut_slice() {
        if entry.function == 0xd {
            *entry = kvm_cpuid_entry2 {
                function: 0xd,
                index: entry.index,
                flags: entry.flags,
                ..Default::default()
            };
            continue;
        }
        let (leaf, subleaf) = (entry.function, entry.index);
        for f in PVM_HIDDEN
            .iter()
            .filter(|f| f.leaf == leaf && f.subleaf == subleaf)
        {
            let reg = reg_mut(entry, f.reg);
            if *reg & (1 << f.bit) != 0 {
                *reg &= !(1 << f.bit);
                hidden.push(f.name);
            }
        }
    }
    hidden
}

/// Fills in what KVM leaves to the VMM for vCPU `id` of `count`: APIC ids, the logical
/// processor count, cache and extended topology (one package; one thread per core, or two
/// with `smt`, as Firecracker's `smt` gives it: APIC id = core << 1 | thread), the
/// hypervisor bit; and turns off the architectural PMU leaf, which Skiff does not offer.
pub fn normalize(cpuid: &mut CpuId, id: u8, count: u8, smt: bool) {
    let id32 = u32::from(id);
    let count32 = u32::from(count);
    let threads = if smt && count > 1 { 2 } else { 1 };
    let smt_shift = threads - 1;
    // Bits needed to number `count` logical processors: the x2APIC id shift of the core level.
    let core_shift = u32::BITS - (count32.max(1) - 1).leading_zeros();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0xff) | (id32 << 24) | (count32 << 16) | (8 << 8);
                entry.ecx |= LEAF1_ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= LEAF1_EDX_HTT;
                } else {
                    entry.edx &= !LEAF1_EDX_HTT;
                }
            }
            4 => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: threads sharing this cache - 1
                // (a core's threads share L1 and L2, the package's share L3).
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count32 - 1 } else { threads - 1 };
                let cores = count32.div_ceil(threads);
                entry.eax = (entry.eax & 0x3fff) | ((cores - 1) << 26) | (sharing << 14);
            }
            0xa => {
                entry.eax = 0;
                entry.ebx = 0;
                entry.ecx = 0;
                entry.edx = 0;
            }
            0xb | 0x1f => {
                entry.edx = id32;
                match entry.index {
                    0 => {
                        entry.eax = smt_shift;
                        entry.ebx = threads;
                        entry.ecx = (LEVEL_TYPE_SMT << 8) | entry.index;
                    }
                    1 => {
                        entry.eax = core_shift;
                        entry.ebx = count32;
                        entry.ecx = (LEVEL_TYPE_CORE << 8) | entry.index;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            0x8000_0008 => {
                // AMD: ECX[7:0] is the number of cores in the package minus one.
                entry.ecx = (entry.ecx & !0xff) | (count32 - 1);
            }
            0x8000_001e => {
                // AMD: EAX the extended APIC id, EBX[15:8] threads per core - 1 and [7:0] the
                // core id.
                entry.eax = id32;
                entry.ebx = (entry.ebx & !0xffff) | ((threads - 1) << 8) | (id32 >> smt_shift);
            }
            _ => {}
        }
    }
}

/// The processor brand string leaves, 48 bytes of ASCII in EAX..EDX of each.
const BRAND_LEAVES: std::ops::RangeInclusive<u32> = 0x8000_0002..=0x8000_0004;

/// Fills the brand string leaves from the host's own CPUID where KVM left them empty (KVM PVM
/// does), as `-cpu host` does in other VMMs: without it the guest has no model name (Linux
/// prints "AMD 19/01" in place of the host's "AMD EPYC"). Leaves KVM filled stay as they are.
pub fn fill_brand_string(cpuid: &mut CpuId) {
    fill_brand_from(cpuid, |leaf| {
        let r = std::arch::x86_64::__cpuid(leaf);
        [r.eax, r.ebx, r.ecx, r.edx]
    });
}

fn fill_brand_from(cpuid: &mut CpuId, host: impl Fn(u32) -> [u32; 4]) {
    let brand = |e: &kvm_cpuid_entry2| BRAND_LEAVES.contains(&e.function);
    let entries = cpuid.as_mut_slice();
    let empty = entries
        .iter()
        .filter(|e| brand(e))
        .all(|e| [e.eax, e.ebx, e.ecx, e.edx] == [0; 4]);
    // Only when the guest's extended range reaches the brand leaves, as on the host.
    let reaches = entries
        .iter()
        .any(|e| e.function == 0x8000_0000 && e.eax >= *BRAND_LEAVES.end());
    if !empty || !reaches {
        return;
    }
    for e in entries.iter_mut().filter(|e| brand(e)) {
        [e.eax, e.ebx, e.ecx, e.edx] = host(e.function);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cpuid_with(entries: &[kvm_cpuid_entry2]) -> CpuId {
        CpuId::from_entries(entries).unwrap()
    }

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    #[test]
    fn leaf1_carries_apic_id_and_count() {
        let mut c = cpuid_with(&[kvm_cpuid_entry2 {
            ebx: 0xffff_ffff,
            ..entry(1, 0)
        }]);
        normalize(&mut c, 3, 4, false);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x08ff);
        assert_ne!(e.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(e.edx & LEAF1_EDX_HTT, 0);
    }

    #[test]
    fn extended_topology_has_smt_and_core_levels() {
        let mut c = cpuid_with(&[entry(0xb, 0), entry(0xb, 1), entry(0xb, 2)]);
        normalize(&mut c, 2, 3, false);
        let s = c.as_slice();
        assert_eq!((s[0].eax, s[0].ebx, s[0].ecx, s[0].edx), (0, 1, 0x100, 2));
        assert_eq!((s[1].eax, s[1].ebx, s[1].ecx, s[1].edx), (2, 3, 0x201, 2));
        assert_eq!((s[2].eax, s[2].ebx, s[2].ecx & 0xff00), (0, 0, 0));
    }

    /// With SMT, two threads per core: the SMT level counts 2 (shift 1), the cache leaf says
    /// half as many cores and L1/L2 shared by a core's two threads, AMD's leaf the thread
    /// count and core id.
    #[test]
    fn smt_makes_two_threads_per_core() {
        let l1 = kvm_cpuid_entry2 {
            eax: 1 << 5,
            ..entry(4, 0)
        };
        let l3 = kvm_cpuid_entry2 {
            eax: 3 << 5,
            ..entry(4, 3)
        };
        let mut c = cpuid_with(&[entry(0xb, 0), entry(0xb, 1), l1, l3, entry(0x8000_001e, 0)]);
        normalize(&mut c, 3, 4, true);
        let s = c.as_slice();
        assert_eq!((s[0].eax, s[0].ebx), (1, 2), "SMT level");
        assert_eq!((s[1].eax, s[1].ebx, s[1].edx), (2, 4, 3), "core level");
        assert_eq!(s[2].eax >> 26, 1, "2 cores");
        assert_eq!((s[2].eax >> 14) & 0xfff, 1, "L1 shared by 2 threads");
        assert_eq!((s[3].eax >> 14) & 0xfff, 3, "L3 shared by all 4");
        assert_eq!(
            (s[4].eax, (s[4].ebx >> 8) & 0xff, s[4].ebx & 0xff),
            (3, 1, 1)
        );
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = cpuid_with(&[kvm_cpuid_entry2 {
            edx: LEAF1_EDX_HTT,
            ..entry(1, 0)
        }]);
        normalize(&mut c, 0, 1, false);
        assert_eq!(c.as_slice()[0].edx & LEAF1_EDX_HTT, 0);
    }

    fn fake_host(leaf: u32) -> [u32; 4] {
        [leaf, leaf + 1, leaf + 2, leaf + 3]
    }

    /// Leaf 0x8000_0000 saying the extended leaves go up to `max`.
    fn extended_range(max: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            eax: max,
            ..entry(0x8000_0000, 0)
        }
    }

    #[test]
    fn empty_brand_string_comes_from_the_host() {
        let mut c = cpuid_with(&[
            extended_range(0x8000_0008),
            entry(0x8000_0002, 0),
            entry(0x8000_0003, 0),
            entry(0x8000_0004, 0),
        ]);
        fill_brand_from(&mut c, fake_host);
        let s = c.as_slice();
        for e in &s[1..] {
            assert_eq!([e.eax, e.ebx, e.ecx, e.edx], fake_host(e.function));
        }
        assert_eq!(s[0].eax, 0x8000_0008, "range leaf untouched");
    }

    #[test]
    fn brand_string_kvm_gave_is_kept() {
        let given = kvm_cpuid_entry2 {
            eax: 0x2044_4d41,
            ..entry(0x8000_0002, 0)
        };
        let mut c = cpuid_with(&[
            extended_range(0x8000_0008),
            given,
            entry(0x8000_0003, 0),
            entry(0x8000_0004, 0),
        ]);
        fill_brand_from(&mut c, fake_host);
        let s = c.as_slice();
        assert_eq!(s[1].eax, 0x2044_4d41);
        assert_eq!(s[2].eax, 0, "a partly given string is left whole");
    }

    #[test]
    fn no_brand_string_below_the_extended_range() {
        let mut c = cpuid_with(&[extended_range(0x8000_0001), entry(0x8000_0002, 0)]);
        fill_brand_from(&mut c, fake_host);
        assert_eq!(c.as_slice()[1].eax, 0);
    }

    #[test]
    fn pvm_hides_what_it_cannot_emulate() {
        let mut c = cpuid_with(&[
            kvm_cpuid_entry2 {
                ecx: (1 << 13) | (1 << 23) | (1 << 26) | 1,
                ..entry(1, 0)
            },
            kvm_cpuid_entry2 {
                ebx: (1 << 20) | (1 << 7) | (1 << 3),
                ..entry(7, 0)
            },
            kvm_cpuid_entry2 {
                eax: 0x7,
                ..entry(0xd, 0)
            },
            kvm_cpuid_entry2 {
                // kvm-clock (3), PV unhalt (7), PV send IPI (11), PV sched yield (13).
                eax: (1 << 3) | (1 << 7) | (1 << 11) | (1 << 13),
                ..entry(KVM_CPUID_FEATURES, 0)
            },
        ]);
        let hidden = hide_pvm_unsupported(&mut c);
        for name in [
            "cx16",
            "popcnt",
            "xsave",
            "smap",
            "smep",
            "kvm_pv_unhalt",
            "kvm_pv_send_ipi",
            "kvm_pv_sched_yield",
        ] {
            assert!(hidden.contains(&name), "{name} not hidden");
        }
        let s = c.as_slice();
        assert_eq!(s[0].ecx, 1, "unrelated bits stay");
        assert_eq!(s[1].ebx, 1 << 3, "bmi1 stays");
        assert_eq!(s[2].eax, 0);
        assert_eq!(s[3].eax, 1 << 3, "kvm-clock stays");
    }
}
