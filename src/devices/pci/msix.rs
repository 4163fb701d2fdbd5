//! MSI-X (PCI 3.0, 6.8.2) for a virtio-pci function: the vector table and pending-bit array the
//! guest programs in the BAR, one eventfd per vector registered as a KVM irqfd on its own GSI,
//! and that GSI's MSI route kept in the VM's routing table as the guest writes the entry. A
//! masked vector's interrupt is kept as its pending bit and delivered when it is unmasked.
//! Which vector each virtio queue and the configuration change use is the driver's choice
//! (virtio 1.2, 4.1.4.3: queue_msix_vector, config_msix_vector), kept here too so that the
//! device thread never waits on the transport's lock to raise an interrupt.

use std::io;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kvm_ioctls::VmFd;
use log::Level;
use serde::{Deserialize, Serialize};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::virtio::{InterruptDelivery, InterruptSource};
use crate::guest_log;
use crate::vstate::vm::{GsiRoutes, RoutingError};

/// The "no vector" value of queue_msix_vector and config_msix_vector (virtio 1.2, 4.1.5.1.2).
pub const NO_VECTOR: u16 = 0xffff;
/// Size of one table entry: message address (low, high), data, vector control.
pub const ENTRY_SIZE: u64 = 16;
/// Where the LAPIC's MSI messages go (Intel SDM 11.11.1): a route to any other address is
/// refused by KVM's MSI injection, so it is not installed.
const MSI_ADDRESS_BASE: u64 = 0xfee0_0000;

/// One table entry, as a snapshot holds it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixEntryState {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control's mask bit.
    pub masked: bool,
    /// The pending bit.
    pub pending: bool,
}

/// The vectors as a snapshot holds them: the table and PBA, the capability's enable and
/// function-mask bits, and which vector each queue and configuration changes use.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsixState {
    /// The table, with the pending bits.
    pub entries: Vec<MsixEntryState>,
    /// MSI-X Enable.
    pub enabled: bool,
    /// Function Mask.
    pub function_masked: bool,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
    /// The configuration vector.
    pub config_vector: u16,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    address: u64,
    data: u32,
    masked: bool,
    pending: bool,
}

#[derive(Debug)]
struct State {
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
    queue_vectors: Vec<u16>,
    config_vector: u16,
}

/// A function's MSI-X vectors.
#[derive(Debug)]
pub struct MsixVectors {
    routes: Arc<GsiRoutes>,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    state: Mutex<State>,
    /// Held while a table write gives KVM a vector's new route, so that interrupts (which take
    /// only `state`) are not held up by the routing ioctl, and routes go in the order of the
    /// writes.
    routing: Mutex<()>,
}

/// Why the vectors cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum MsixError {
    /// An eventfd could not be created.
    #[error("cannot create an MSI-X eventfd")]
    EventFd(#[source] io::Error),
    /// KVM refused a route.
    #[error("cannot route GSI {0}")]
    Route(u32, #[source] RoutingError),
    /// KVM refused an irqfd.
    #[error("cannot register the irqfd for GSI {0}")]
    Irqfd(u32, #[source] kvm_ioctls::Error),
    /// A saved table does not fit the device.
    #[error("the saved MSI-X table does not fit the device")]
    Shape,
}

impl MsixVectors {
    /// One vector per GSI in `gsis` for a device with `queues` queues, all masked; each GSI gets
    /// its irqfd and a placeholder route (the guest's own comes with its table writes).
    pub fn new(routes: Arc<GsiRoutes>, gsis: Vec<u32>, queues: usize) -> Result<Self, MsixError> {
        let mut irqfds = Vec::with_capacity(gsis.len());
        for &gsi in &gsis {
            let evt =
                EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(MsixError::EventFd)?;
            routes
                .set_msi(gsi, MSI_ADDRESS_BASE, 0)
                .map_err(|e| MsixError::Route(gsi, e))?;
            routes
                .vm()
                .register_irqfd(&evt, gsi)
                .map_err(|e| MsixError::Irqfd(gsi, e))?;
            irqfds.push(evt);
        }
        let entry = Entry {
            address: 0,
            data: 0,
            masked: true,
            pending: false,
        };
        Ok(Self {
            state: Mutex::new(State {
                entries: vec![entry; gsis.len()],
                enabled: false,
                function_masked: false,
                queue_vectors: vec![NO_VECTOR; queues],
                config_vector: NO_VECTOR,
            }),
            routes,
            gsis,
            irqfds,
            routing: Mutex::new(()),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Number of vectors (the table size).
    pub fn len(&self) -> usize {
        self.gsis.len()
    }

    /// Whether there are no vectors.
    pub fn is_empty(&self) -> bool {
        self.gsis.is_empty()
    }

    /// The VM, for the function's ioeventfds.
    pub fn vm(&self) -> &VmFd {
        self.routes.vm()
    }

    /// The MSI-X Enable and Function Mask bits of the capability's message control changed;
    /// vectors now deliverable get their pending interrupts.
    pub fn set_control(&self, enabled: bool, function_masked: bool) {
        let mut s = self.state();
        s.enabled = enabled;
        s.function_masked = function_masked;
        self.deliver_pending(&mut s);
    }

    fn deliver_pending(&self, s: &mut State) {
        if !s.enabled || s.function_masked {
            return;
        }
        for (v, e) in s.entries.iter_mut().enumerate() {
            if e.pending && !e.masked {
                e.pending = false;
                let _ = self.irqfds[v].write(1);
            }
        }
    }

    /// The guest reads the table at `offset`.
    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.state();
        let (index, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Some(e) = s
            .entries
            .get(index)
            .filter(|_| data.len() == 4 && field % 4 == 0)
        else {
            data.fill(0);
            return;
        };
        let value = match field {
            0 => (e.address & 0xffff_ffff) as u32,
            4 => (e.address >> 32) as u32,
            8 => e.data,
            _ => u32::from(e.masked),
        };
        data.copy_from_slice(&value.to_le_bytes());
    }

    /// The guest writes the table at `offset` (4-byte accesses; 8-byte ones as two).
    pub fn table_write(&self, offset: u64, data: &[u8]) {
        if data.len() == 8 {
            self.table_write(offset, &data[..4]);
            self.table_write(offset + 4, &data[4..]);
            return;
        }
        let (index, field) = ((offset / ENTRY_SIZE) as usize, offset % ENTRY_SIZE);
        let Ok(word) = <[u8; 4]>::try_from(data) else {
            guest_log!(
                Level::Debug,
                "msix: {}-byte table write at {offset:#x}",
                data.len()
            );
            return;
        };
        let value = u32::from_le_bytes(word);
        let mut s = self.state();
        let Some(e) = s.entries.get_mut(index).filter(|_| field % 4 == 0) else {
            guest_log!(
                Level::Debug,
                "msix: write to table entry {index} of {} ignored",
                self.gsis.len()
            );
            return;
        };
        let message = (e.address, e.data);
        match field {
            0 => e.address = (e.address & !0xffff_ffff) | u64::from(value),
            4 => e.address = (e.address & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.data = value,
            _ => e.masked = value & 1 != 0,
        }
        let changed = message != (e.address, e.data);
        if changed {
            drop(s);
            let _routing = self.routing.lock().unwrap_or_else(PoisonError::into_inner);
            // The entry as it is now: a later write from another vCPU may have changed it.
            let (address, msg) = {
                let s = self.state();
                (s.entries[index].address, s.entries[index].data)
            };
            if address & !0xf_ffff == MSI_ADDRESS_BASE {
                if let Err(e) = self.routes.set_msi(self.gsis[index], address, msg) {
                    guest_log!(Level::Warn, "msix: cannot route vector {index}: {e}");
                }
            }
            s = self.state();
        }
        self.deliver_pending(&mut s);
    }

    /// The pending-bit array at `offset`.
    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        let s = self.state();
        let offset = usize::try_from(offset).unwrap_or(usize::MAX / 16);
        for (i, b) in data.iter_mut().enumerate() {
            let first = (offset + i) * 8;
            *b = (0..8)
                .filter(|bit| s.entries.get(first + bit).is_some_and(|e| e.pending))
                .fold(0u8, |acc, bit| acc | (1 << bit));
        }
    }

    /// The driver maps queue `queue` to `vector`; returns what the register reads back:
    /// [`NO_VECTOR`] for a vector the table does not have (virtio 1.2, 4.1.5.1.2).
    pub fn set_queue_vector(&self, queue: usize, vector: u16) -> u16 {
        let len = self.len();
        let mut s = self.state();
        let Some(slot) = s.queue_vectors.get_mut(queue) else {
            return NO_VECTOR;
        };
        *slot = if usize::from(vector) < len {
            vector
        } else {
            NO_VECTOR
        };
        *slot
    }

    /// Queue `queue`'s vector.
    pub fn queue_vector(&self, queue: usize) -> u16 {
        self.state()
            .queue_vectors
            .get(queue)
            .copied()
            .unwrap_or(NO_VECTOR)
    }

    /// The driver maps configuration changes to `vector`; returns what reads back.
    pub fn set_config_vector(&self, vector: u16) -> u16 {
        let len = self.len();
        let mut s = self.state();
        s.config_vector = if usize::from(vector) < len {
            vector
        } else {
            NO_VECTOR
        };
        s.config_vector
    }

    /// The configuration vector.
    pub fn config_vector(&self) -> u16 {
        self.state().config_vector
    }

    /// The vectors, for a snapshot.
    pub fn save(&self) -> MsixState {
        let s = self.state();
        MsixState {
            entries: (s.entries.iter())
                .map(|e| MsixEntryState {
                    address: e.address,
                    data: e.data,
                    masked: e.masked,
                    pending: e.pending,
                })
                .collect(),
            enabled: s.enabled,
            function_masked: s.function_masked,
            queue_vectors: s.queue_vectors.clone(),
            config_vector: s.config_vector,
        }
    }

    /// Puts back what [`MsixVectors::save`] saved and routes every programmed vector's GSI
    /// again; refused when the table or queue count differs from this device's. Pending bits
    /// stay pending (the interrupt controllers' own state says what was delivered).
    pub fn restore(&self, saved: &MsixState) -> Result<(), MsixError> {
        let mut s = self.state();
        if saved.entries.len() != s.entries.len()
            || saved.queue_vectors.len() != s.queue_vectors.len()
        {
            return Err(MsixError::Shape);
        }
        for (index, (e, saved)) in s.entries.iter_mut().zip(&saved.entries).enumerate() {
            *e = Entry {
                address: saved.address,
                data: saved.data,
                masked: saved.masked,
                pending: saved.pending,
            };
            if e.address & !0xf_ffff == MSI_ADDRESS_BASE {
                let gsi = self.gsis[index];
                (self.routes)
                    .set_msi(gsi, e.address, e.data)
                    .map_err(|err| MsixError::Route(gsi, err))?;
            }
        }
        s.enabled = saved.enabled;
        s.function_masked = saved.function_masked;
        s.queue_vectors.clone_from(&saved.queue_vectors);
        s.config_vector = saved.config_vector;
        Ok(())
    }

    /// The device was reset: no vector mapped any more (the table itself stays).
    pub fn reset_mapping(&self) {
        let mut s = self.state();
        s.queue_vectors.fill(NO_VECTOR);
        s.config_vector = NO_VECTOR;
    }
}

impl InterruptDelivery for MsixVectors {
    fn deliver(&self, source: InterruptSource) -> io::Result<()> {
        let mut s = self.state();
        let vector = match source {
            InterruptSource::Queue(q) => s.queue_vectors.get(usize::from(q)).copied(),
            InterruptSource::Config => Some(s.config_vector),
        };
        let Some(v) = vector.map(usize::from).filter(|&v| v < self.irqfds.len()) else {
            // No vector: the driver hears nothing (it has no INTx line either).
            return Ok(());
        };
        if !s.enabled {
            return Ok(());
        }
        if s.function_masked || s.entries[v].masked {
            s.entries[v].pending = true;
            return Ok(());
        }
        drop(s);
        self.irqfds[v].write(1)
    }
}
