//! Firecracker config files (`--config-file`) as a user may write them: parsed into the
//! `FullVmConfig` document and converted to a `VmConfig` as `main` does, then the kernel
//! command line is built from it as `Vm::new` does (the user's `boot_args`, PVM parameters,
//! the root device).
//!
//! Checked besides "no panic": an accepted file, written back out as `GET /vm/config` shows
//! it, loads as the same VM.

#![no_main]

use libfuzzer_sys::fuzz_target;
use skiff::api::model::FullVmConfig;
use skiff::arch::x86_64::boot::{add_pvm_workarounds, append_kernel_params, build_cmdline};

fuzz_target!(|data: &[u8]| {
    // What main does with the file's bytes.
    let Ok(doc) = serde_json::from_slice::<FullVmConfig>(data) else {
        return;
    };
    let Ok(config) = doc.to_vm_config() else {
        return;
    };

    let written = serde_json::to_value(FullVmConfig::of(&config, None, None)).expect("serialises");
    let reread: FullVmConfig = serde_json::from_value(written.clone()).expect("parses back");
    let again = reread
        .to_vm_config()
        .unwrap_or_else(|e| panic!("Skiff refuses the config it wrote: {e}\n{written}"));
    assert_eq!(
        again, config,
        "the config changed on the way through its file"
    );

    // The command line, as Vm::new builds it.
    let Ok(mut cmdline) = build_cmdline(&config.cmdline) else {
        return;
    };
    let _ = add_pvm_workarounds(&mut cmdline);
    let mut params = vec!["virtio_mmio.device=4K@0xd0000000:5".to_owned()];
    if let Some(root) = config.disks.iter().find(|d| d.root) {
        params.push(match &root.partuuid {
            Some(uuid) => format!("root=PARTUUID={uuid}"),
            None => "root=/dev/vda".to_owned(),
        });
    }
    let _ = append_kernel_params(&mut cmdline, &params);
});
