//! Firecracker's built-in CPU templates (`cpu_template` in `/machine-config`) over the real API
//! socket: the names and refusals Firecracker 1.16.1 gives, and what a booted test guest reads
//! from CPUID and MSRs with the template for this host's vendor.
//!
//! What reaches the guest on a KVM PVM host, seen with the test guest's `cpuinfo` check on an
//! Intel one: CPUID leaf 1 EAX (the version) and leaf 0x80000001 take the template, as does
//! IA32_ARCH_CAPABILITIES; leaf 1 ECX/EDX, leaf 7 and leaf 0xd come from the host CPU as it
//! is, so the tests read only the former.

mod common;

use std::time::Duration;

use common::api::{fault, Running};
use common::test_guest;
use skiff::arch::x86_64::cpu_template::{Bits, CpuidRegister};
use skiff::arch::x86_64::static_cpu_template::StaticCpuTemplate;

const LIMIT: Duration = Duration::from_secs(60);
const START: &str = r#"{"action_type": "InstanceStart"}"#;
const CTRL_ALT_DEL: &str = r#"{"action_type": "SendCtrlAltDel"}"#;
/// CPUID.01H:EAX's version bits, and the version the T2 family sets them to (Haswell-EP).
const VERSION: u32 = 0x0fff_3fff;
const T2_VERSION: u32 = 0x0003_06f2;
/// CPUID.80000001H:ECX bit 8, PREFETCHW, which every T2 template clears.
const PREFETCHW: u32 = 1 << 8;
/// IA32_ARCH_CAPABILITIES, and the value T2S gives it whatever the host has.
const ARCH_CAPABILITIES: u32 = 0x10a;
const T2S_ARCH_CAPABILITIES: u64 = 0x0c08_0c4c;

fn intel_host() -> bool {
    let l0 = std::arch::x86_64::__cpuid(0);
    [l0.ebx, l0.edx, l0.ecx]
        .iter()
        .flat_map(|r| r.to_le_bytes())
        .eq(*b"GenuineIntel")
}

/// The boot source, with the guest told to print CPUID leaves 1 and 0x80000001 and `msr`.
fn boot_source(msr: u32) -> String {
    format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 checks=cpuinfo,ctrlaltdel cpuid_leaf=1,2147483649 msr={msr}"}}"#,
        test_guest().display()
    )
}

/// One register of the guest's `cpuid <leaf>: eax=.. ebx=.. ecx=.. edx=..` line.
fn register(vm: &Running, leaf: &str, reg: &str) -> u32 {
    let line = vm.wait_for(&format!("cpuid {leaf}:"), LIMIT);
    line.split(&format!("{reg}="))
        .nth(1)
        .and_then(|r| u32::from_str_radix(r.split_whitespace().next()?, 16).ok())
        .unwrap_or_else(|| panic!("no {reg} in {line}"))
}

fn msr(vm: &Running, index: u32) -> u64 {
    let line = vm.wait_for(&format!("msr {index:x}:"), LIMIT);
    u64::from_str_radix(line.rsplit(": ").next().unwrap_or("").trim(), 16)
        .unwrap_or_else(|_| panic!("{line}"))
}

/// `bits` as a custom template's bitmap of `width` characters: 0 and 1 where it changes a
/// bit, x where it keeps it.
fn bitmap(bits: Bits, width: u32) -> String {
    let text: String = (0..width)
        .rev()
        .map(|i| match (bits.mask >> i & 1, bits.value >> i & 1) {
            (0, _) => 'x',
            (_, 0) => '0',
            _ => '1',
        })
        .collect();
    format!("0b{text}")
}

/// A built-in template as a `PUT /cpu-config` body, for hosts it was not made for.
fn as_custom(template: StaticCpuTemplate) -> String {
    let t = template.template();
    let cpuid: Vec<_> = t
        .cpuid
        .iter()
        .map(|&(leaf, subleaf, register, bits)| {
            let register = match register {
                CpuidRegister::Eax => "eax",
                CpuidRegister::Ebx => "ebx",
                CpuidRegister::Ecx => "ecx",
                CpuidRegister::Edx => "edx",
            };
            serde_json::json!({
                "leaf": format!("{leaf:#x}"),
                "subleaf": format!("{subleaf:#x}"),
                "flags": 0,
                "modifiers": [{"register": register, "bitmap": bitmap(bits, 32)}],
            })
        })
        .collect();
    let msrs: Vec<_> = t
        .msrs
        .iter()
        .map(|&(addr, bits)| serde_json::json!({"addr": format!("{addr:#x}"), "bitmap": bitmap(bits, 64)}))
        .collect();
    serde_json::json!({"cpuid_modifiers": cpuid, "msr_modifiers": msrs}).to_string()
}

fn machine_config(template: &str) -> String {
    format!(r#"{{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "{template}"}}"#)
}

/// Names Firecracker does not know on x86 (V1N1 is its aarch64 template) get its deserialize
/// error; the other vendor's template is taken, shown, and refused at InstanceStart with
/// Firecracker's words; "None" then clears it, is not shown, and the guest boots with the
/// host's own CPU version.
#[test]
fn templates_are_refused_where_firecracker_refuses_them_and_none_clears() {
    let vm = Running::start("cpu-template-refusals", &[]);
    for name in ["V1N1", "t2", "T3"] {
        let (status, answer) = vm.call("PUT", "/machine-config", Some(&machine_config(name)));
        assert_eq!(status, 400, "{answer}");
        let expected = format!(
            "An error occurred when deserializing the json body of a request: unknown variant \
             `{name}`, expected one of `C3`, `T2`, `T2S`, `None`, `T2CL`, `T2A`"
        );
        assert!(fault(&answer).starts_with(&expected), "{answer}");
    }
    let other = if intel_host() { "T2A" } else { "T2" };
    let (status, answer) = vm.call("PUT", "/machine-config", Some(&machine_config(other)));
    assert_eq!(status, 204, "{answer}");
    let (_, config) = vm.call("GET", "/vm/config", None);
    assert!(
        config.contains(&format!(r#""cpu_template":"{other}""#)),
        "{config}"
    );
    let boot = boot_source(0x1a0);
    assert_eq!(vm.call("PUT", "/boot-source", Some(&boot)).0, 204);
    let (status, answer) = vm.call("PUT", "/actions", Some(START));
    assert_eq!(status, 400, "{answer}");
    assert_eq!(
        fault(&answer),
        "Start microvm error: Failed to get CPU template: CPU vendor mismatched between actual \
         CPU and CPU template."
    );

    let none = r#"{"cpu_template": "None"}"#;
    assert_eq!(vm.call("PATCH", "/machine-config", Some(none)).0, 204);
    let (_, shown) = vm.call("GET", "/machine-config", None);
    assert!(!shown.contains("cpu_template"), "{shown}");
    assert_eq!(vm.call("PUT", "/actions", Some(START)).0, 204);
    let host_version = std::arch::x86_64::__cpuid(1).eax & VERSION;
    assert_eq!(register(&vm, "1", "eax") & VERSION, host_version);
    assert_eq!(vm.call("PUT", "/actions", Some(CTRL_ALT_DEL)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}

/// The template for this host's vendor (T2S on Intel, for its MSR as well as its CPUID; T2A
/// on AMD) is taken and shown; on a CPU model it was made for it boots, elsewhere it is
/// refused with Firecracker's words and the same template goes in through `/cpu-config`.
/// Either way the guest reads T2's version, no PREFETCHW, and on Intel T2S's fixed
/// IA32_ARCH_CAPABILITIES.
#[test]
fn the_template_for_this_hosts_vendor_reaches_the_guest() {
    let intel = intel_host();
    let (name, template) = if intel {
        ("T2S", StaticCpuTemplate::T2S)
    } else {
        ("T2A", StaticCpuTemplate::T2A)
    };
    let vm = Running::start("cpu-template-own", &[]);
    let (status, answer) = vm.call("PUT", "/machine-config", Some(&machine_config(name)));
    assert_eq!(status, 204, "{answer}");
    let (_, shown) = vm.call("GET", "/machine-config", None);
    assert!(
        shown.contains(&format!(r#""cpu_template":"{name}""#)),
        "{shown}"
    );
    let index = if intel { ARCH_CAPABILITIES } else { 0x1a0 };
    assert_eq!(
        vm.call("PUT", "/boot-source", Some(&boot_source(index))).0,
        204
    );
    if template.template_for_host().is_err() {
        let (status, answer) = vm.call("PUT", "/actions", Some(START));
        assert_eq!(status, 400, "{answer}");
        assert_eq!(
            fault(&answer),
            "Start microvm error: Failed to get CPU template: The current CPU model is not \
             permitted to apply the CPU template."
        );
        let custom = as_custom(template);
        let (status, answer) = vm.call("PUT", "/cpu-config", Some(&custom));
        assert_eq!(status, 204, "{answer}");
        let (_, shown) = vm.call("GET", "/machine-config", None);
        assert!(
            !shown.contains("cpu_template"),
            "a custom template replaces it: {shown}"
        );
    }
    let (status, answer) = vm.call("PUT", "/actions", Some(START));
    assert_eq!(status, 204, "{answer}");
    assert_eq!(register(&vm, "1", "eax") & VERSION, T2_VERSION);
    assert_eq!(register(&vm, "80000001", "ecx") & PREFETCHW, 0);
    if intel {
        assert_eq!(msr(&vm, ARCH_CAPABILITIES), T2S_ARCH_CAPABILITIES);
    }
    assert_eq!(vm.call("PUT", "/actions", Some(CTRL_ALT_DEL)).0, 204);
    vm.wait_for("PASS ctrlaltdel", LIMIT);
}
