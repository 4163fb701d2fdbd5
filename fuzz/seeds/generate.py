#!/usr/bin/env python3
"""Writes the seed inputs of Skiff's fuzz targets (fuzz/seeds/TARGET/NAME): well-formed
requests, register sequences, kernels, documents and frames that the fuzzer then mutates, so
that it starts past the parsers' first checks. Each layout follows the comment at the top of the
target's source. Run it again after changing a target's input layout.

The snapshot_state seeds are real state files written by tests/snapshot.rs (a test guest with a
disk; with a disk and a NIC; with the entropy device, the vsock device, a balloon, a pmem device,
hot-plugged memory; a disk on virtio-pci, target/tmp/snapshot/pci-full/pci.snap) and one with a
NIC answering for MMDS written by tests/mmds.rs (target/tmp/mmds-snap/vm.snap); copy new ones from target/tmp/ after the state format changes (a
field added at the end of the state can also be added to the seeds: append its encoding to the
payload, fix the length and the CRC, as was done for DevicesState's mmds and pci)."""

import json
import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))
F_NEXT, F_WRITE = 1, 2


def put(target, name, data):
    os.makedirs(os.path.join(HERE, target), exist_ok=True)
    with open(os.path.join(HERE, target, name), "wb") as f:
        f.write(data)


class Memory:
    """A guest memory image from address 0."""

    def __init__(self):
        self.b = bytearray()

    def write(self, addr, data):
        if len(self.b) < addr + len(data):
            self.b.extend(bytes(addr + len(data) - len(self.b)))
        self.b[addr : addr + len(data)] = data

    def ring(self, desc, avail, chains):
        """Descriptor table at `desc`, `chains` (lists of (addr, len, flags)) made available
        at `avail`, one after another."""
        i, heads = 0, []
        for chain in chains:
            heads.append(i)
            for j, (addr, length, flags) in enumerate(chain):
                last = j == len(chain) - 1
                d = struct.pack("<QIHH", addr, length, flags | (0 if last else F_NEXT), i + 1)
                self.write(desc + 16 * i, d)
                i += 1
        self.write(avail, struct.pack("<HH", 0, len(heads)))
        for k, h in enumerate(heads):
            self.write(avail + 4 + 2 * k, struct.pack("<H", h))


def blk_header(kind, sector):
    return struct.pack("<IIQ", kind, 0, sector)


def block_requests(mem):
    """Read, write, flush, get-id and an unknown request on a queue of 16 at 0/0x100/0x140."""
    mem.write(0x200, blk_header(0, 1))
    mem.write(0x210, blk_header(1, 2))
    mem.write(0x220, blk_header(4, 0))
    mem.write(0x230, blk_header(8, 0))
    mem.write(0x240, blk_header(77, 0))
    mem.write(0x600, bytes(range(256)) * 2)
    mem.ring(
        0x000,
        0x100,
        [
            [(0x200, 16, 0), (0x400, 512, F_WRITE), (0x840, 1, F_WRITE)],
            [(0x210, 16, 0), (0x600, 512, 0), (0x841, 1, F_WRITE)],
            [(0x220, 16, 0), (0x842, 1, F_WRITE)],
            [(0x230, 16, 0), (0x800, 20, F_WRITE), (0x843, 1, F_WRITE)],
            [(0x240, 16, 0), (0x844, 1, F_WRITE)],
        ],
    )
    mem.write(0x850, b"\0")


def virtio_block():
    for name, cfg, sectors in [("requests", 4, 7), ("event-idx-read-only", 0x24 | 0x10, 0x13)]:
        mem = Memory()
        block_requests(mem)
        put("virtio_block", name, struct.pack("<BBHHH", cfg, sectors, 0, 0x100, 0x140) + mem.b)


def virtio_net():
    mem = Memory()
    # RX queue of 4 at 0/0x40/0x60, TX queue of 4 at 0x100/0x140/0x160.
    mem.ring(0x000, 0x040, [[(0x1000, 2048, F_WRITE)], [(0x2000, 60, F_WRITE)], [(0x3000, 6, F_WRITE), (0x3100, 2048, F_WRITE)]])
    mem.ring(0x100, 0x140, [[(0x200, 12, 0), (0x20c, 60, 0)], [(0x200, 72, 0)]])
    mem.write(0x200, bytes(12) + bytes(range(60)))
    frames = [bytes(12) + bytes(range(100)), bytes(12) + bytes(range(20)), bytes(12) + bytes(300)]
    body = b"".join(struct.pack("<H", len(f)) + f for f in frames)
    head = struct.pack("<BB", 0x22, 0x11) + struct.pack("<6H", 0, 0x40, 0x60, 0x100, 0x140, 0x160)
    put("virtio_net", "frames", head + struct.pack("<B", len(frames)) + body + mem.b)


def vsock_header(op, src_port, dst_port, length=0, flags=0, src_cid=3, dst_cid=2, kind=1):
    return struct.pack("<QQIIIHHIII", src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, 65536, 0)


def virtio_vsock():
    mem = Memory()
    # RX, TX and event queues of 4 at 0/0x40/0x60, 0x100/0x140/0x160 and 0x200/0x240/0x260.
    mem.ring(0x000, 0x040, [[(0x1000, 0x1000, F_WRITE)], [(0x2000, 0x1000, F_WRITE)], [(0x3000, 0x1000, F_WRITE)]])
    mem.write(0x400, vsock_header(1, 1024, 53))
    mem.write(0x500, vsock_header(5, 1024, 53, 5) + b"hello")
    mem.write(0x600, vsock_header(4, 1024, 53, flags=3))
    mem.write(0x700, vsock_header(5, 1025, 9, 3) + b"abc")
    mem.ring(0x100, 0x140, [[(0x400, 44, 0)], [(0x500, 20, 0), (0x514, 29, 0)], [(0x600, 44, 0)], [(0x700, 47, 0)]])
    mem.ring(0x200, 0x240, [[(0x800, 4, F_WRITE)]])
    host = b"CONNECT 52\nhello"
    rings = struct.pack("<9H", 0, 0x40, 0x60, 0x100, 0x140, 0x160, 0x200, 0x240, 0x260)
    put("virtio_vsock", "both-ways", struct.pack("<BB", 0x22, 0x42) + rings + struct.pack("<B", len(host)) + host + mem.b)
    put("virtio_vsock", "restored", struct.pack("<BB", 0x22, 0x72) + rings + struct.pack("<B", len(host)) + host + mem.b)


REGS = [0x000, 0x004, 0x008, 0x00C, 0x010, 0x014, 0x020, 0x024, 0x030, 0x034, 0x038, 0x044,
        0x050, 0x060, 0x064, 0x070, 0x080, 0x084, 0x090, 0x094, 0x0A0, 0x0A4, 0x0FC, 0x100, 0x104]


def reg(offset, value):
    """Operation 4: a 4-byte write to a register picked by index."""
    return struct.pack("<BBI", 4, REGS.index(offset), value)


def read(offset):
    """Operation 0: a 4-byte read."""
    return struct.pack("<BH", 0 | (2 << 3), offset)


def virtio_mmio():
    mem = Memory()
    block_requests(mem)
    ops = b"".join(
        [
            reg(0x070, 0), reg(0x070, 1), reg(0x070, 3),
            read(0x000), read(0x008), reg(0x014, 1), read(0x010),
            reg(0x024, 1), reg(0x020, 1), reg(0x024, 0), reg(0x020, 0),
            reg(0x070, 11), read(0x070),
            reg(0x030, 0), read(0x034), reg(0x038, 16),
            reg(0x080, 0), reg(0x084, 0), reg(0x090, 0x100), reg(0x094, 0),
            reg(0x0A0, 0x140), reg(0x0A4, 0), reg(0x044, 1),
            reg(0x070, 15), reg(0x050, 0), b"\x05",
            read(0x060), reg(0x064, 1), read(0x100), read(0x0FC),
            reg(0x070, 0), read(0x070),
        ]
    )
    put("virtio_mmio", "linux-driver", struct.pack("<H", len(ops)) + ops + mem.b)


def elf(pvh):
    """An x86_64 ELF vmlinux: one PT_LOAD at 1 MiB, and a PVH entry note if `pvh`."""
    ehdr_size, phdr_size = 64, 56
    phnum = 2 if pvh else 1
    code = b"\xf4" * 16  # hlt
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x100000)
    code_off = ehdr_size + phnum * phdr_size
    note_off = code_off + len(code)
    ehdr = b"\x7fELF" + bytes([2, 1, 1]) + bytes(9)
    ehdr += struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x100000, ehdr_size, 0, 0, ehdr_size,
                        phdr_size, phnum, 0, 0, 0)
    phdrs = struct.pack("<IIQQQQQQ", 1, 5, code_off, 0x100000, 0x100000, len(code), 0x2000, 0x1000)
    if pvh:
        phdrs += struct.pack("<IIQQQQQQ", 4, 4, note_off, 0, 0, len(note), len(note), 4)
    return ehdr + phdrs + code + (note if pvh else b"")


def bzimage(initrd_addr_max):
    """A bzImage with one setup sector, boot protocol 2.15, loaded high, 4 KiB of kernel."""
    img = bytearray(2 * 512 + 4096)
    struct.pack_into("<B", img, 0x1F1, 1)  # setup_sects
    struct.pack_into("<H", img, 0x1FE, 0xAA55)
    struct.pack_into("<I", img, 0x202, 0x53726448)  # "HdrS"
    struct.pack_into("<H", img, 0x206, 0x020F)
    struct.pack_into("<B", img, 0x211, 1)  # loadflags: LOADED_HIGH
    struct.pack_into("<I", img, 0x214, 0x100000)  # code32_start
    struct.pack_into("<I", img, 0x22C, initrd_addr_max)
    return bytes(img)


def kernel_loader():
    put("kernel_loader", "elf-pvh", struct.pack("<BI", 2, 0x1000) + elf(True))
    put("kernel_loader", "elf", struct.pack("<BI", 6, 0x80000000) + elf(False))
    put("kernel_loader", "bzimage", struct.pack("<BI", 2, 0x10000) + bzimage(0x37FFFFFF))
    put("kernel_loader", "bzimage-low-max", struct.pack("<BI", 2, 0x3000) + bzimage(0x180000))


BOOT = {"kernel_image_path": "/vmlinux", "boot_args": "console=ttyS0 -- init", "initrd_path": "/initrd"}
MACHINE = {"vcpu_count": 2, "mem_size_mib": 256, "smt": False, "track_dirty_pages": True}
DRIVE = {"drive_id": "rootfs", "path_on_host": "/rootfs.ext4", "is_root_device": True,
         "partuuid": "1234-abcd", "is_read_only": False, "cache_type": "Unsafe", "io_engine": "Sync"}
NET = {"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}


BALLOON = {"amount_mib": 16, "deflate_on_oom": True, "stats_polling_interval_s": 1,
           "free_page_hinting": True, "free_page_reporting": False}


def api_request():
    def req(method, path, body=None):
        return bytes([["GET", "PUT", "PATCH", "DELETE"].index(method)]) + path.encode() + (
            b" " + json.dumps(body).encode() if body is not None else b"")

    sequence = [
        req("PUT", "/boot-source", BOOT),
        req("PUT", "/machine-config", MACHINE),
        req("PATCH", "/machine-config", {"vcpu_count": 1}),
        req("PUT", "/drives/rootfs", DRIVE),
        req("PUT", "/network-interfaces/eth0", NET),
        req("PATCH", "/drives/rootfs", {"drive_id": "rootfs", "path_on_host": "/other"}),
        req("PATCH", "/network-interfaces/eth0", {"iface_id": "eth0", "rx_rate_limiter": {}}),
        req("PUT", "/actions", {"action_type": "SendCtrlAltDel"}),
        req("PATCH", "/vm", {"state": "Paused"}),
        req("GET", "/vm/config"),
        req("GET", "/"),
        req("PUT", "/logger", {"level": "Debug"}),
        req("PUT", "/vsock", {}),
    ]
    put("api_request", "configure", b"\xff".join(sequence))
    balloon = [
        req("PUT", "/machine-config", MACHINE),
        req("PUT", "/balloon", BALLOON),
        req("GET", "/balloon"),
        req("PATCH", "/balloon", {"amount_mib": 1}),
        req("PATCH", "/balloon/statistics", {"stats_polling_interval_s": 2}),
        req("PATCH", "/balloon/hinting/start"),
        req("GET", "/balloon/hinting/status"),
        req("PUT", "/boot-source", BOOT),
        req("GET", "/vm/config"),
    ]
    put("api_request", "balloon", b"\xff".join(balloon))


def config_file():
    full = {
        "boot-source": BOOT,
        "machine-config": MACHINE,
        "drives": [DRIVE, {"drive_id": "data", "path_on_host": "/data.img", "is_root_device": False,
                           "rate_limiter": {}}],
        "network-interfaces": [NET],
        "logger": {"log_path": "/log", "level": "Info"},
        "metrics": {"metrics_path": "/metrics"},
    }
    put("config_file", "full", json.dumps(full, indent=1).encode())
    put("config_file", "balloon", json.dumps(dict(full, balloon=BALLOON), indent=1).encode())
    put("config_file", "minimal", json.dumps({"boot-source": {"kernel_image_path": "k"}}).encode())
    put("config_file", "unsupported", json.dumps({"boot-source": BOOT, "mmds-config": {}}).encode())
    put("config_file", "vsock", json.dumps({"boot-source": BOOT, "vsock": {"guest_cid": 3, "uds_path": "/v.sock"}}).encode())


def mmds():
    def segment(flags, seq, ack, data=b"", options=b""):
        return (struct.pack("<BBBIIHB", 1, 0, flags, seq, ack, 65535, len(options)) + options
                + struct.pack("<H", len(data)) + data)

    def http(text):
        return struct.pack("<BH", 2, len(text)) + text

    arp = (b"\xff" * 6 + bytes([6, 0, 0, 0, 0, 2, 8, 6, 0, 1, 8, 0, 6, 4, 0, 1, 6, 0, 0, 0, 0, 2, 10, 0, 0, 2])
           + bytes(6) + bytes([169, 254, 169, 254]))
    put_token = b"PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 60\r\n\r\n"
    answer = (b"HTTP/1.1 200 \r\nServer: Firecracker API\r\nConnection: keep-alive\r\n"
              b"X-metadata-token-ttl-seconds: 60\r\nContent-Type: text/plain\r\nContent-Length: 64\r\n\r\n")
    answer_len = len(answer) + 64
    session = (struct.pack("<BH", 4, len(arp)) + arp
               + segment(0x02, 0, 0, options=bytes([2, 4, 5, 0xb4]))
               + segment(0x18, 1, 1, put_token)
               + segment(0x11, 1 + len(put_token), 1 + answer_len)
               + segment(0x10, 2 + len(put_token), 2 + answer_len)
               + http(b"GET /latest/meta-data HTTP/1.1\r\nAccept: application/json\r\n\r\n")
               + http(b"GET /s HTTP/1.0\r\nX-metadata-token: 00\r\n\r\n"))
    put("mmds", "v2-session", b"\x01" + session)
    put("mmds", "v1-session", b"\x02" + session)
    doc = {"boot-source": BOOT, "network-interfaces": [NET],
           "mmds-config": {"version": "V2", "network_interfaces": [NET["iface_id"]],
                           "ipv4_address": "169.254.170.2", "imds_compat": True}}
    put("config_file", "mmds", json.dumps(doc, indent=1).encode())

    def req(method, path, body=None):
        return bytes([["GET", "PUT", "PATCH", "DELETE"].index(method)]) + path.encode() + (
            b" " + json.dumps(body).encode() if body is not None else b"")

    put("api_request", "mmds", b"\xff".join([
        req("PUT", "/boot-source", BOOT),
        req("PUT", "/network-interfaces/eth0", NET),
        req("GET", "/mmds"),
        req("PATCH", "/mmds", {"a": None}),
        req("PUT", "/mmds", {"latest": {"meta-data": {"ami-id": "ami-1"}}}),
        req("PATCH", "/mmds", {"latest": {"meta-data": {"ami-id": None, "x": [1]}}}),
        req("PUT", "/mmds/config", {"version": "V2", "network_interfaces": ["eth0"],
                                    "ipv4_address": "169.254.170.2", "imds_compat": True}),
        req("GET", "/vm/config"),
    ]))


def agent_frames():
    # bincode's standard encoding: enum variants and lengths as varints (one byte below 251),
    # signed integers zigzagged.
    def frame(body):
        return struct.pack("<I", len(body)) + body

    def string(text):
        return bytes([len(text)]) + text

    exec_ = (b"\x01\x03" + string(b"sh") + string(b"-c") + string(b"echo hi; exit 7")
             + b"\x01" + string(b"K") + string(b"v") + b"\x01" + string(b"/tmp") + b"\x01"
             + b"\x01\x18\x50" + b"\x01\xfb\xe8\x03")
    put("agent_frames", "host-exec", b"\x00" + frame(exec_) + frame(b"\x04\x03abc")
        + frame(b"\x05") + frame(b"\x06\x0f") + frame(b"\x07\x18\x50"))
    put("agent_frames", "host-files", b"\x00" + frame(b"\x02" + string(b"/f") + b"\xfb\xa4\x01")
        + frame(b"\x08\x02hi") + frame(b"\x09") + frame(b"\x03" + string(b"/f")))
    put("agent_frames", "agent-run", b"\x01" + frame(b"\x00\x01" + string(b"skiff-agent 0.1.0"))
        + frame(b"\x01\x05") + frame(b"\x02\x03out") + frame(b"\x03\x03err")
        + frame(b"\x04\x00\x0e\x00") + frame(b"\x04\x01\x12\x01"))
    put("agent_frames", "agent-files", b"\x01" + frame(b"\x05\x02hi") + frame(b"\x06")
        + frame(b"\x07") + frame(b"\x08" + string(b"no such file")))


for make in [virtio_block, virtio_net, virtio_vsock, virtio_mmio, kernel_loader, api_request, config_file,
             mmds, agent_frames]:
    make()
