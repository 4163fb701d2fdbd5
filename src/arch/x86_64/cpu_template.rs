//! Firecracker's custom CPU templates (`PUT /cpu-config`): bitmaps that set, clear or keep
//! each bit of a CPUID register or an MSR. A bitmap is `0b` and one character per bit, most
//! significant first: `0` clears it, `1` sets it, `x` keeps what KVM (and Skiff) give; fewer
//! characters than the register's bits leave the high bits kept; `_` may separate groups.

use kvm_bindings::CpuId;
use serde::{Deserialize, Serialize};

/// A template as the API takes it and `GET /vm/config` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomCpuTemplate {
    /// KVM capabilities to add or (with `!`) remove: taken and shown; Skiff checks the
    /// capabilities it needs itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    /// CPUID register modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 only: refused when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<serde_json::Value>,
    /// aarch64 only: refused when not empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<serde_json::Value>,
}

/// The modifiers of one CPUID leaf and subleaf.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf, as hex (`0x`), binary (`0b`) or decimal.
    pub leaf: String,
    /// Subleaf, the same way.
    pub subleaf: String,
    /// KVM's flags for the entry (KVM_CPUID_FLAG_SIGNIFCANT_INDEX).
    pub flags: u32,
    /// One bitmap per register.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// A CPUID register's bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// eax, ebx, ecx or edx.
    pub register: CpuidRegister,
    /// 32-bit bitmap.
    pub bitmap: String,
}

/// A CPUID output register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuidRegister {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// An MSR's bitmap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// The MSR's address, as hex, binary or decimal.
    pub addr: String,
    /// 64-bit bitmap.
    pub bitmap: String,
}

/// Bits to change: `value` where `mask` is set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bits {
    /// The bits the bitmap sets or clears.
    pub mask: u64,
    /// Their values.
    pub value: u64,
}

impl Bits {
    /// `old` with the bits changed.
    pub fn apply(self, old: u64) -> u64 {
        (old & !self.mask) | (self.value & self.mask)
    }
}

/// A template checked and parsed, ready to apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    /// (leaf, subleaf, register, bits).
    pub cpuid: Vec<(u32, u32, CpuidRegister, Bits)>,
    /// (MSR, bits).
    pub msrs: Vec<(u32, Bits)>,
}

fn number(text: &str, what: &str) -> Result<u64, String> {
    let t = text.replace('_', "");
    let parsed = if let Some(hex) = t.strip_prefix("0x") {
        u64::from_str_radix(hex, 16)
    } else if let Some(bin) = t.strip_prefix("0b") {
        u64::from_str_radix(bin, 2)
    } else {
        t.parse()
    };
    parsed.map_err(|_| format!("{what} '{text}' is not a hex, binary or decimal number"))
}

fn bitmap(text: &str, bits: u32) -> Result<Bits, String> {
    let bad = |why: &str| format!("bitmap '{text}': {why}");
    let body: String = text
        .strip_prefix("0b")
        .ok_or_else(|| bad("it must start with 0b"))?
        .chars()
        .filter(|&c| c != '_')
        .collect();
    if body.is_empty() || body.len() > bits as usize {
        return Err(bad(&format!("it must have 1 to {bits} bits")));
    }
    let mut b = Bits { mask: 0, value: 0 };
    for (i, c) in body.chars().rev().enumerate() {
        let bit = 1u64 << i;
        match c {
            '0' => b.mask |= bit,
            '1' => {
                b.mask |= bit;
                b.value |= bit;
            }
            'x' | 'X' => {}
            other => return Err(bad(&format!("'{other}' is not 0, 1 or x"))),
        }
    }
    Ok(b)
}

impl CustomCpuTemplate {
    /// Checks every number and bitmap.
    pub fn parse(&self) -> Result<CpuTemplate, String> {
        if !self.reg_modifiers.is_empty() || !self.vcpu_features.is_empty() {
            return Err("reg_modifiers and vcpu_features are for aarch64 hosts".into());
        }
        for cap in &self.kvm_capabilities {
            number(cap.trim_start_matches('!'), "KVM capability")?;
        }
        let mut template = CpuTemplate::default();
        for leaf in &self.cpuid_modifiers {
            let l = u32::try_from(number(&leaf.leaf, "CPUID leaf")?)
                .map_err(|_| format!("CPUID leaf '{}' is more than 32 bits", leaf.leaf))?;
            let s = u32::try_from(number(&leaf.subleaf, "CPUID subleaf")?)
                .map_err(|_| format!("CPUID subleaf '{}' is more than 32 bits", leaf.subleaf))?;
            for m in &leaf.modifiers {
                template
                    .cpuid
                    .push((l, s, m.register, bitmap(&m.bitmap, 32)?));
            }
        }
        for msr in &self.msr_modifiers {
            let addr = u32::try_from(number(&msr.addr, "MSR address")?)
                .map_err(|_| format!("MSR address '{}' is more than 32 bits", msr.addr))?;
            template.msrs.push((addr, bitmap(&msr.bitmap, 64)?));
        }
        Ok(template)
    }
}

impl CpuTemplate {
    /// Changes `cpuid`'s registers; a leaf and subleaf that KVM does not offer is an error.
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), String> {
        for &(leaf, subleaf, register, bits) in &self.cpuid {
            let entry = cpuid
                .as_mut_slice()
                .iter_mut()
                .find(|e| e.function == leaf && e.index == subleaf)
                .ok_or_else(|| {
                    format!("CPUID leaf {leaf:#x} subleaf {subleaf:#x} is not offered by this host's KVM")
                })?;
            let reg = match register {
                CpuidRegister::Eax => &mut entry.eax,
                CpuidRegister::Ebx => &mut entry.ebx,
                CpuidRegister::Ecx => &mut entry.ecx,
                CpuidRegister::Edx => &mut entry.edx,
            };
            // A 32-bit bitmap only has bits 0..31.
            *reg = u32::try_from(bits.apply(u64::from(*reg)) & 0xffff_ffff).unwrap_or(*reg);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn bitmaps_set_clear_and_keep() {
        let b = bitmap("0b1x0", 32).unwrap();
        assert_eq!(b.apply(0b011), 0b110);
        assert_eq!(b.apply(0b000), 0b100);
        let full = bitmap(&format!("0b{}", "x".repeat(31) + "0"), 32).unwrap();
        assert_eq!(full.apply(u64::from(u32::MAX)), u64::from(u32::MAX - 1));
        assert!(bitmap("1010", 32).is_err());
        assert!(bitmap("0b", 32).is_err());
        assert!(bitmap("0b102", 32).is_err());
        assert!(bitmap(&format!("0b{}", "1".repeat(33)), 32).is_err());
        assert_eq!(bitmap("0b1_0000", 64).unwrap().value, 16);
        assert_eq!(number("0x10a", "n"), Ok(0x10a));
        assert_eq!(number("0b100001010", "n"), Ok(266));
        assert_eq!(number("266", "n"), Ok(266));
        assert!(number("0xzz", "n").is_err());
    }

    #[test]
    fn a_template_changes_the_registers_it_names() {
        let t: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0", "flags": 1,
                "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx10"}]}],
                "msr_modifiers": [{"addr": "0x1a0", "bitmap": "0b1"}]}"#,
        )
        .unwrap();
        let parsed = t.parse().unwrap();
        assert_eq!(parsed.msrs, vec![(0x1a0, Bits { mask: 1, value: 1 })]);
        let mut cpuid = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 7,
            index: 0,
            ebx: 0xffff_fff1,
            ..Default::default()
        }])
        .unwrap();
        parsed.apply_cpuid(&mut cpuid).unwrap();
        assert_eq!(cpuid.as_slice()[0].ebx, 0xffff_fff2);
        let missing: CustomCpuTemplate = serde_json::from_str(
            r#"{"cpuid_modifiers": [{"leaf": "0x99", "subleaf": "0", "flags": 0, "modifiers": []}]}"#,
        )
        .unwrap();
        let mut none = missing.parse().unwrap();
        none.cpuid
            .push((0x99, 0, CpuidRegister::Eax, Bits { mask: 1, value: 1 }));
        assert!(none.apply_cpuid(&mut cpuid).unwrap_err().contains("0x99"));
        let arm: CustomCpuTemplate = serde_json::from_str(r#"{"reg_modifiers": [{}]}"#).unwrap();
        assert!(arm.parse().is_err());
    }
}
