//! virtio-net through the real path: the test guest drives the device like a driver on a TAP
//! inside a throw-away network namespace, and a host UDP socket on the TAP's address exchanges
//! datagrams with it. The host kernel drops datagrams whose checksums are wrong, so each one
//! arriving proves the guest's checksum (full or offloaded); the guest checks the host's.

mod common;

use std::collections::BTreeSet;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::{as_strs, run_args, run_command, skiff_bin, test_guest, Outcome, Transport};

const LIMIT: Duration = Duration::from_secs(60);
const GUEST: &str = "172.30.0.2:5556";
const HOST: &str = "172.30.0.1:5555";
const COUNT: u32 = 16;

/// Boots the test guest's net check on `tap` in `ns` with `params` added to its command line,
/// then takes the host's socket from `socket`; receives the guest's datagrams on it, sends the
/// host's (each padded with a pattern the guest checks), and returns the guest's sequence
/// numbers with the run's outcome.
fn exchange(
    transport: Transport,
    ns: &NetNs,
    tap: &str,
    params: &str,
    socket: impl FnOnce() -> UdpSocket,
) -> (BTreeSet<u32>, Outcome) {
    let args = run_args(
        test_guest(),
        None,
        &format!("checks=net net_ip=172.30.0.2 net_peer=172.30.0.1 net_tx={COUNT} net_rx={COUNT} {params}"),
        1,
        128,
    );
    let mut args = as_strs(&args);
    let net = format!("tap={tap},mac=06:00:ac:1e:00:02");
    args.extend(["--net", &net]);
    args.extend(transport.flags());
    let cmd = ns.command(skiff_bin(), &args);
    let vm = std::thread::spawn(move || run_command(cmd, LIMIT, None, None));
    let sock = socket();
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();

    let guest: SocketAddr = GUEST.parse().unwrap();
    let mut seqs = BTreeSet::new();
    let mut buf = [0u8; 2048];
    while seqs.len() < COUNT as usize {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from, guest);
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let seq: u32 = text
            .strip_prefix("skiff-net seq=")
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("unexpected datagram {text:?}"));
        seqs.insert(seq);
    }
    if seqs.len() == COUNT as usize {
        // 'a' to 'z' over and over after a space, of lengths up to 600 bytes: with the
        // guest's 64-byte receive buffers, a datagram spans up to 11 of them.
        for i in 0..COUNT {
            let pad: String = (0..40 * i as usize)
                .map(|j| char::from(b'a' + u8::try_from(j % 26).unwrap()))
                .collect();
            sock.send_to(format!("host-net seq={i} {pad}").as_bytes(), guest)
                .unwrap();
        }
    }
    (seqs, vm.join().unwrap())
}

fn assert_passed(seqs: &BTreeSet<u32>, out: &Outcome) {
    assert_eq!(
        *seqs,
        (0..COUNT).collect(),
        "datagrams from the guest\n{}\n{}",
        out.stdout,
        out.stderr
    );
    let lines = out.lines();
    assert!(
        lines.contains(&"PASS net") && lines.contains(&"DONE passed=1 failed=0"),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}

#[test]
fn frames_flow_both_ways_with_checksums_checked() {
    for transport in Transport::BOTH {
        frames_flow_on(transport);
    }
}

fn frames_flow_on(transport: Transport) {
    let ns = NetNs::with_tap(&format!("net-{transport:?}"), "tap0", "172.30.0.1/24");
    let sock = ns.udp_socket(HOST.parse().unwrap());
    let (seqs, out) = exchange(transport, &ns, "tap0", "", || sock);
    assert_passed(&seqs, &out);
    // MRG_RXBUF: every datagram (at least 70 bytes with its headers) came in several of the
    // guest's 64-byte buffers, num_buffers saying how many, and its padding arrived intact.
    assert!(
        out.stdout
            .contains("net: MRG_RXBUF on, 64-byte receive buffers"),
        "{}",
        out.stdout
    );
    let tail = format!(" frames in several buffers, {COUNT} padded datagrams checked");
    let merged: u32 = (out.stdout.lines())
        .find_map(|l| l.strip_prefix("net: ")?.strip_suffix(tail.as_str()))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", out.stdout));
    assert!(merged >= COUNT, "{}", out.stdout);
    // The guest accepted checksum offload, so Skiff set TUNSETOFFLOAD and the host kernel
    // handed over every datagram with a partial checksum for the guest to complete.
    let want = format!(
        "{COUNT} datagrams for us ({COUNT} distinct), {COUNT} with partial checksums, 0 bad checksums, 0 malformed"
    );
    assert!(out.stdout.contains(&want), "{}", out.stdout);
}

#[test]
fn an_absent_tap_is_created_up_and_carries_frames() {
    let ns = NetNs::new("newtap");
    // Without MRG_RXBUF, which keeps the one-buffer receive path covered.
    let (seqs, out) = exchange(Transport::Mmio, &ns, "skiffnew0", "net_mrg=0", || {
        // Skiff creates the TAP and brings it up; the host side then gives it an address, as
        // an operator would, and the guest's ARP retries find it.
        let start = Instant::now();
        let link = loop {
            match ns.link("skiffnew0") {
                Some(link) if link.contains(",UP") => break link,
                _ if start.elapsed() > Duration::from_secs(20) => {
                    panic!("skiff did not create the TAP: {:?}", ns.link("skiffnew0"))
                }
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        assert!(link.contains("skiffnew0"), "{link}");
        ns.add_address("skiffnew0", "172.30.0.1/24");
        ns.udp_socket(HOST.parse().unwrap())
    });
    assert_passed(&seqs, &out);
    assert!(
        out.stdout.contains("net: MRG_RXBUF off, 2048-byte")
            && out
                .stdout
                .contains("net: 0 frames in several buffers, 16 padded"),
        "{}",
        out.stdout
    );
    // The TAP was Skiff's: it is gone with the process.
    assert!(ns.link("skiffnew0").is_none());
}

/// Runs the guest's netbench (`ntx` datagrams of 1000 bytes out, then the host's 100 in) on
/// a TAP in a namespace named after `tag`, with `net_opts` added to `--net`; returns the
/// datagrams the host received from the guest and the run's outcome.
fn netbench(tag: &str, ntx: u32, net_opts: &str) -> (u32, Outcome) {
    let ns = NetNs::with_tap(tag, "tap0", "172.30.0.1/24");
    let sock = ns.udp_socket(HOST.parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let args = run_args(
        test_guest(),
        None,
        &format!("checks=netbench netbench_tx={ntx} netbench_size=1000"),
        1,
        128,
    );
    let mut args = as_strs(&args);
    let net = format!("tap=tap0,mac=06:00:ac:1e:00:02{net_opts}");
    args.extend(["--net", &net]);
    let cmd = ns.command(skiff_bin(), &args);
    let vm = std::thread::spawn(move || run_command(cmd, LIMIT, None, None));
    let mut buf = [0u8; 2048];
    let (mut frames, mut guest) = (0, None);
    while let Ok((n, from)) = sock.recv_from(&mut buf) {
        if buf[..n].starts_with(b"skiff-net seq=") {
            assert_eq!(n, 1000);
            frames += 1;
        } else if buf[..n].starts_with(b"skiff-net rx-ready") {
            guest = Some(from);
            break;
        }
    }
    if let Some(guest) = guest {
        for i in 0..100 {
            sock.send_to(format!("host-net seq={i}").as_bytes(), guest)
                .unwrap();
            std::thread::sleep(Duration::from_micros(200));
        }
        for _ in 0..3 {
            std::thread::sleep(Duration::from_millis(20));
            sock.send_to(b"host-net end", guest).unwrap();
        }
    }
    (frames, vm.join().unwrap())
}

#[test]
fn benchmark_work_runs_and_reports() {
    // tools/bench relies on this guest mode; here it runs small, with a Rust host side.
    let (frames, out) = netbench("netbench", 300, "");
    assert_eq!(frames, 300, "{}\n{}", out.stdout, out.stderr);
    let lines = out.lines();
    assert!(lines.contains(&"PASS netbench"), "{}", out.stdout);
    // Sent and received from the guest's ring 3 (native on PVM hosts).
    assert!(
        lines.contains(&"bench: netbench in ring 3"),
        "{}",
        out.stdout
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("BENCH net tx-udp ops=300 bytes=300000 us=")),
        "{}",
        out.stdout
    );
    let rx = lines
        .iter()
        .find_map(|l| l.strip_prefix("BENCH net rx-udp ops="))
        .and_then(|r| r.split(' ').next()?.parse::<u32>().ok());
    assert!(rx.is_some_and(|n| n > 0 && n <= 100), "{}", out.stdout);
}

/// `--net ...,tx_pps=200` (200 frames in the bucket, refilled in a second) holds what the
/// guest sends to that rate, as the guest measures it: 600 frames, of which the bucket gives
/// the first 200 less the few the guest's ARP took, go in 2 s within 10 %; none is lost.
#[test]
fn transmit_rate_limit_holds_the_guest_to_its_rate() {
    let (frames, out) = netbench("netrate", 600, ",tx_pps=200");
    assert_eq!(frames, 600, "{}\n{}", out.stdout, out.stderr);
    assert!(out.lines().contains(&"PASS netbench"), "{}", out.stdout);
    let us: f64 = out
        .lines()
        .iter()
        .find_map(|l| l.strip_prefix("BENCH net tx-udp ops=600 bytes=600000 us="))
        .and_then(|us| us.parse().ok())
        .unwrap_or_else(|| panic!("no tx-udp line\n{}", out.stdout));
    // Between 150 and 200 frames were in the bucket when the guest's clock started.
    let (low, high) = (400.0 * 1e6 / us, 450.0 * 1e6 / us);
    eprintln!(
        "600 frames in {:.3} s: {low:.1} to {high:.1}/s, limit 200/s",
        us / 1e6
    );
    assert!(
        low <= 220.0 && high >= 180.0,
        "600 frames in {us} µs is {low:.1} to {high:.1}/s, the limit 200/s\n{}",
        out.stdout
    );
}

/// The guest side of the snapshot tests with a network device, on a plain boot: the
/// `snapshot` check sends the datagram "snap-tick N" at every tick, in order, and passes.
#[test]
fn the_snapshot_check_sends_a_datagram_every_tick() {
    let ns = NetNs::with_tap("netsnap", "tap0", "172.30.0.1/24");
    let sock = ns.udp_socket(HOST.parse().unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let args = run_args(test_guest(), None, "checks=snapshot ticks_max=20", 1, 64);
    let mut args = as_strs(&args);
    args.extend(["--net", "tap=tap0,mac=06:00:ac:1e:00:02"]);
    let cmd = ns.command(skiff_bin(), &args);
    let vm = std::thread::spawn(move || run_command(cmd, LIMIT, None, None));
    let mut buf = [0u8; 2048];
    let mut ticks = Vec::new();
    while ticks.len() < 20 {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            break;
        };
        assert_eq!(from, GUEST.parse().unwrap());
        let text = std::str::from_utf8(&buf[..n]).unwrap();
        let tick: u32 = text
            .strip_prefix("snap-tick ")
            .and_then(|t| t.parse().ok())
            .unwrap_or_else(|| panic!("unexpected datagram {text:?}"));
        ticks.push(tick);
    }
    let out = vm.join().unwrap();
    assert_eq!(
        ticks,
        (0..20).collect::<Vec<_>>(),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    let lines = out.lines();
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("snapshot: ticking (disk no, network yes, entropy no,"))
            && lines
                .iter()
                .any(|l| l.starts_with("snapshot: 0 marker reads, 20 datagrams sent"))
            && lines.contains(&"PASS snapshot"),
        "{}",
        out.stdout
    );
    assert_eq!(out.code, Some(0), "{}", out.stderr);
}
