//! `swarmnet-dnsload`: a light, busy-polling DNS load generator that checks every answer.
//!
//! ```text
//! swarmnet-dnsload --names FILE [--server 127.0.0.11:53] [--sockets 4] [--batch 32]
//!                  (--window N | --rate QPS) [--duration 3] [--warmup 0.5] [--timeout-ms 200]
//!                  [--server-pid PID] [--server-cpu N]
//! ```
//!
//! With `--server-pid`, the server's CPU time (all its threads) over the measured window is
//! reported (`server_cpu_s`); with `--server-cpu`, how busy that core was in the same window,
//! whoever used it (`core_busy_frac`): on a shared machine, a server core busy with other work
//! explains a low `server_util`.
//!
//! `FILE` has one `name address` pair per line; queries are A queries for the names in turn,
//! and an answer is valid only if it is a NOERROR response to an outstanding query id whose
//! question is that name and whose answer holds that address.
//!
//! - `--window N`: closed loop, N queries in flight (split over the sockets): the server's
//!   capacity when its core is saturated.
//! - `--rate QPS`: open loop at a fixed rate: latency at that load.
//!
//! One thread, non-blocking sockets, `sendmmsg`/`recvmmsg` in batches, never sleeps. Where the
//! backlog sits tells who the bottleneck is: every 10 ms it samples /proc/net/udp of its
//! namespace (the server listens in the same one) — queries waiting in the server's socket
//! (`server_backlog_frac`: share of samples) mean the server is saturated; answers waiting in
//! the generator's own sockets (`gen_backlog_frac`) mean the generator is, and then its numbers
//! say nothing about the server. Both sides batch, so both queues are often non-empty; what
//! decides is where most of the window waits: `server_queue_share` = bytes queued at the
//! server ÷ bytes queued at both, summed over the samples. `idle_frac` is the share of time spent in loop turns that found
//! nothing to do. Prints one JSON object on stdout.

use std::collections::VecDeque;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const MAX_MSG: usize = 1500;
/// Latency histogram: 1 µs buckets up to 100 ms, the rest in the last bucket.
const HIST_US: usize = 100_000;

struct Args {
    server: SocketAddr,
    names: String,
    sockets: usize,
    batch: usize,
    window: Option<usize>,
    rate: Option<f64>,
    duration: f64,
    warmup: f64,
    timeout: Duration,
    server_pid: Option<u32>,
    server_cpu: Option<usize>,
}

fn usage() -> ! {
    eprintln!(
        "usage: swarmnet-dnsload --names FILE [--server ADDR:PORT] [--sockets N] [--batch N] \
         (--window N | --rate QPS) [--duration S] [--warmup S] [--timeout-ms MS] \
         [--server-pid PID] [--server-cpu N]"
    );
    std::process::exit(2)
}

fn parse_args() -> Args {
    let mut a = Args {
        server: "127.0.0.11:53".parse().expect("literal"),
        names: String::new(),
        sockets: 4,
        batch: 32,
        window: None,
        rate: None,
        duration: 3.0,
        warmup: 0.5,
        timeout: Duration::from_millis(200),
        server_pid: None,
        server_cpu: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().unwrap_or_else(|| usage());
        let bad = |what: &str| -> ! {
            eprintln!("{k} {v}: {what}");
            usage()
        };
        match k.as_str() {
            "--server" => a.server = v.parse().unwrap_or_else(|_| bad("not ADDR:PORT")),
            "--names" => a.names = v,
            "--sockets" => a.sockets = v.parse().unwrap_or_else(|_| bad("not a number")),
            "--batch" => a.batch = v.parse().unwrap_or_else(|_| bad("not a number")),
            "--window" => a.window = Some(v.parse().unwrap_or_else(|_| bad("not a number"))),
            "--rate" => a.rate = Some(v.parse().unwrap_or_else(|_| bad("not a number"))),
            "--duration" => a.duration = v.parse().unwrap_or_else(|_| bad("not a number")),
            "--warmup" => a.warmup = v.parse().unwrap_or_else(|_| bad("not a number")),
            "--server-pid" => a.server_pid = Some(v.parse().unwrap_or_else(|_| bad("not a pid"))),
            "--server-cpu" => a.server_cpu = Some(v.parse().unwrap_or_else(|_| bad("not a cpu"))),
            "--timeout-ms" => {
                a.timeout = Duration::from_millis(v.parse().unwrap_or_else(|_| bad("not a number")))
            }
            _ => usage(),
        }
    }
    if a.names.is_empty() || a.window.is_some() == a.rate.is_some() || a.sockets == 0 {
        usage();
    }
    a.batch = a.batch.clamp(1, 1024);
    a
}

/// One name: its query (id bytes patched per send), where its question ends, the expected A.
struct Name {
    query: Vec<u8>,
    want: Ipv4Addr,
}

fn build_query(name: &str) -> Vec<u8> {
    let mut q = vec![0, 0, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in name.trim_end_matches('.').split('.') {
        q.push(u8::try_from(label.len()).expect("label under 64 bytes"));
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&[0, 1, 0, 1]);
    q
}

fn load_names(path: &str) -> io::Result<Vec<Name>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let mut f = line.split_whitespace();
        let (Some(n), Some(ip)) = (f.next(), f.next()) else {
            continue;
        };
        let want = ip.parse().map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("line {}: {ip}: {e}", i + 1),
            )
        })?;
        out.push(Name {
            query: build_query(n),
            want,
        });
    }
    if out.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidData, "no names"));
    }
    Ok(out)
}

fn skip_name(b: &[u8], mut i: usize) -> Option<usize> {
    for _ in 0..128 {
        let l = *b.get(i)?;
        match l & 0xC0 {
            0 if l == 0 => return Some(i + 1),
            0 => i += 1 + usize::from(l),
            0xC0 => return b.get(i + 1).map(|_| i + 2),
            _ => return None,
        }
    }
    None
}

/// Whether `r` is a valid answer to `q` sent with `id` (same id, question echoed case-insensitively,
/// NOERROR, an A record equal to `want` in the answer section).
fn valid(q: &[u8], id: u16, r: &[u8], want: Ipv4Addr) -> bool {
    if r.len() < 12 || r[..2] != id.to_be_bytes() || r[2] & 0x80 == 0 || r[3] & 0x0F != 0 {
        return false;
    }
    if r[4..6] != [0, 1] {
        return false;
    }
    let qlen = q.len() - 12;
    match r.get(12..12 + qlen) {
        Some(echo) if echo.eq_ignore_ascii_case(&q[12..]) => {}
        _ => return false,
    }
    let an = u16::from_be_bytes([r[6], r[7]]);
    let mut i = 12 + qlen;
    for _ in 0..an {
        let Some(j) = skip_name(r, i) else {
            return false;
        };
        let Some(fixed) = r.get(j..j + 10) else {
            return false;
        };
        let ty = u16::from_be_bytes([fixed[0], fixed[1]]);
        let len = usize::from(u16::from_be_bytes([fixed[8], fixed[9]]));
        let Some(data) = r.get(j + 10..j + 10 + len) else {
            return false;
        };
        if ty == 1 && len == 4 && data == want.octets() {
            return true;
        }
        i = j + 10 + len;
    }
    false
}

/// Outstanding queries of one socket, by id.
struct Slot {
    sent_ns: u64,
    name: u32,
    live: bool,
}

struct Sock {
    sock: UdpSocket,
    slots: Vec<Slot>,
    next_id: u16,
    inflight: usize,
}

#[derive(Default)]
struct Stats {
    sent: u64,
    answered: u64,
    invalid: u64,
    lost: u64,
    hist: Vec<u32>,
}

impl Stats {
    fn new() -> Self {
        Self {
            hist: vec![0; HIST_US + 1],
            ..Self::default()
        }
    }

    fn percentile_us(&self, p: f64) -> f64 {
        let total: u64 = self.hist.iter().map(|&c| u64::from(c)).sum();
        if total == 0 {
            return f64::NAN;
        }
        let rank = ((p / 100.0) * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (us, &c) in self.hist.iter().enumerate() {
            seen += u64::from(c);
            if seen >= rank {
                return us as f64;
            }
        }
        HIST_US as f64
    }
}

/// utime + stime of every thread of `pid`, in clock ticks (USER_HZ = 100).
fn proc_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let f: Vec<&str> = s.rsplit_once(')')?.1.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// (busy, total, irq + softirq) ticks of one core from /proc/stat.
fn core_ticks(cpu: usize) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    let line = s.lines().find(|l| l.starts_with(&format!("cpu{cpu} ")))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3)? + v.get(4)?;
    Some((total - idle, total, v.get(5)? + v.get(6)?))
}

/// UDP sockets of this namespace from /proc/net/udp: (drops, queued receive bytes) summed
/// for the server's sockets and for the given ports (this generator). The server's are those
/// on port 53 or on the resolver address 127.0.0.11 at any port: netd's sockets sit on random
/// ports behind a DNAT from 127.0.0.11:53 (as Docker's do).
fn udp_sockets(ours: &[u16]) -> ((u64, u64), (u64, u64)) {
    // 127.0.0.11 as /proc/net/udp prints it (the address's bytes in host order, x86: LE).
    let resolver = format!("{:08X}", u32::from_ne_bytes([127, 0, 0, 11]));
    let text = std::fs::read_to_string("/proc/net/udp").unwrap_or_default();
    let (mut server, mut gen_) = ((0, 0), (0, 0));
    for l in text.lines().skip(1) {
        let f: Vec<&str> = l.split_whitespace().collect();
        let (Some(local), Some(queues), Some(drops)) = (f.get(1), f.get(4), f.last()) else {
            continue;
        };
        let port = local
            .rsplit_once(':')
            .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
        let drops: u64 = drops.parse().unwrap_or(0);
        let rxq = queues
            .split_once(':')
            .and_then(|(_, rx)| u64::from_str_radix(rx, 16).ok())
            .unwrap_or(0);
        let on_resolver = local.split_once(':').is_some_and(|(ip, _)| ip == resolver);
        let slot = match port {
            Some(p) if ours.contains(&p) => &mut gen_,
            Some(53) => &mut server,
            Some(_) if on_resolver => &mut server,
            _ => continue,
        };
        slot.0 += drops;
        slot.1 += rxq;
    }
    (server, gen_)
}

fn udp_drops(ours: &[u16]) -> (u64, u64) {
    let (s, g) = udp_sockets(ours);
    (s.0, g.0)
}

#[derive(Clone, Copy)]
struct Sample {
    server: Option<u64>,
    core: Option<(u64, u64, u64)>,
    drops: (u64, u64),
}

fn sample(args: &Args, ports: &[u16]) -> Sample {
    Sample {
        server: args.server_pid.and_then(proc_ticks),
        core: args.server_cpu.and_then(core_ticks),
        drops: udp_drops(ports),
    }
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass; no other memory is touched.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above; RUSAGE_SELF is always valid.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn main() {
    let args = parse_args();
    let names = match load_names(&args.names) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("{}: {e}", args.names);
            std::process::exit(2)
        }
    };
    let mut socks: Vec<Sock> = (0..args.sockets)
        .map(|_| {
            let s = UdpSocket::bind("0.0.0.0:0").expect("bind");
            s.connect(args.server).expect("connect");
            s.set_nonblocking(true).expect("nonblocking");
            // Room for a few hundred ms of answers if this process is descheduled (a shared
            // machine), so the generator's own buffer does not drop what the server sent.
            // SO_RCVBUFFORCE (root) passes net.core.rmem_max; failing that, the default.
            let size: libc::c_int = 8 << 20;
            // SAFETY: setsockopt reads sizeof(c_int) bytes from `size`, which outlives the call.
            unsafe {
                libc::setsockopt(
                    s.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    (&raw const size).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                );
            }
            Sock {
                sock: s,
                slots: (0..65536)
                    .map(|_| Slot {
                        sent_ns: 0,
                        name: 0,
                        live: false,
                    })
                    .collect(),
                next_id: 0,
                inflight: 0,
            }
        })
        .collect();
    let ports: Vec<u16> = socks
        .iter()
        .filter_map(|s| s.sock.local_addr().ok())
        .map(|a| a.port())
        .collect();
    let per_sock_window = args.window.map(|w| w.div_ceil(args.sockets).max(1));

    let batch = args.batch;
    let mut out_bufs: Vec<[u8; MAX_MSG]> = vec![[0; MAX_MSG]; batch];
    let mut out_iov: Vec<libc::iovec> = Vec::with_capacity(batch);
    let mut out_hdr: Vec<libc::mmsghdr> = Vec::with_capacity(batch);
    let mut in_bufs: Vec<[u8; MAX_MSG]> = vec![[0; MAX_MSG]; batch];
    let mut in_iov: Vec<libc::iovec> = in_bufs
        .iter_mut()
        .map(|b| libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: MAX_MSG,
        })
        .collect();
    // SAFETY: mmsghdr is plain data; all-zero is a valid empty header.
    let mut in_hdr: Vec<libc::mmsghdr> =
        (0..batch).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (h, iov) in in_hdr.iter_mut().zip(in_iov.iter_mut()) {
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }

    // Send order, for timeouts: (socket, id, sent_ns).
    let mut order: VecDeque<(u16, u16, u64)> = VecDeque::new();
    let mut stats = Stats::new();
    let mut total_answered = 0u64;
    let mut total_sent = 0u64;
    let mut invalid_examples: Vec<String> = Vec::new();
    let mut next_name = 0usize;
    let start = Instant::now();
    let ns_now = |start: Instant| start.elapsed().as_nanos() as u64;
    let warmup_ns = (args.warmup * 1e9) as u64;
    let end_ns = warmup_ns + (args.duration * 1e9) as u64;
    let timeout_ns = args.timeout.as_nanos() as u64;
    let mut measuring = warmup_ns == 0;
    let mut measure_start_ns = 0u64;
    let mut idle_ns = 0u64;
    let mut sched_sent = 0u64; // open loop: sent since the start
    let cpu0 = cpu_seconds();
    let mut cpu_measure0 = cpu0;
    let mut s0 = sample(&args, &ports);
    let mut s1: Option<Sample> = None;
    let mut measured_wall_ns = 0u64;
    // Where the backlog sits, sampled every 10 ms: queries queued at the server's socket mean
    // the server is the bottleneck; answers queued at ours mean this generator is.
    let (mut samples, mut server_backlog, mut gen_backlog) = (0u64, 0u64, 0u64);
    let (mut server_bytes, mut gen_bytes) = (0u64, 0u64);
    let mut next_sample_ns = 0u64;
    let mut rr = 0usize;

    loop {
        let turn_start = ns_now(start);
        if !measuring && turn_start >= warmup_ns {
            measuring = true;
            measure_start_ns = turn_start;
            stats = Stats::new();
            idle_ns = 0;
            cpu_measure0 = cpu_seconds();
            s0 = sample(&args, &ports);
        }
        let sending = turn_start < end_ns;
        if !sending && s1.is_none() {
            s1 = Some(sample(&args, &ports));
            measured_wall_ns = turn_start - measure_start_ns;
        }
        let total_inflight: usize = socks.iter().map(|s| s.inflight).sum();
        if !sending && total_inflight == 0 {
            break;
        }
        if !sending && turn_start > end_ns + timeout_ns {
            break;
        }
        let mut did = false;

        // Send: one batch on one socket per turn, round robin.
        if sending {
            let si = rr % socks.len();
            rr += 1;
            let s = &mut socks[si];
            let mut n = batch;
            if let Some(w) = per_sock_window {
                n = n.min(w.saturating_sub(s.inflight));
            }
            if let Some(rate) = args.rate {
                let due = ((turn_start as f64 / 1e9) * rate) as u64;
                n = n.min(due.saturating_sub(sched_sent) as usize);
            }
            if n > 0 {
                out_iov.clear();
                out_hdr.clear();
                let mut ids = Vec::with_capacity(n);
                for b in out_bufs.iter_mut().take(n) {
                    let name = next_name;
                    next_name = (next_name + 1) % names.len();
                    let id = s.next_id;
                    s.next_id = s.next_id.wrapping_add(1);
                    let q = &names[name].query;
                    b[..q.len()].copy_from_slice(q);
                    b[..2].copy_from_slice(&id.to_be_bytes());
                    out_iov.push(libc::iovec {
                        iov_base: b.as_mut_ptr().cast(),
                        iov_len: q.len(),
                    });
                    ids.push((id, name));
                }
                for iov in out_iov.iter_mut() {
                    // SAFETY: plain data; all-zero is a valid empty header.
                    let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                    h.msg_hdr.msg_iov = iov;
                    h.msg_hdr.msg_iovlen = 1;
                    out_hdr.push(h);
                }
                // SAFETY: out_hdr holds n headers pointing at iovecs and buffers that live
                // until the call returns; the socket is connected (no msg_name needed).
                let r = unsafe {
                    libc::sendmmsg(
                        s.sock.as_raw_fd(),
                        out_hdr.as_mut_ptr(),
                        out_hdr.len() as libc::c_uint,
                        libc::MSG_DONTWAIT,
                    )
                };
                if r > 0 {
                    did = true;
                    let now = ns_now(start);
                    for &(id, name) in ids.iter().take(r as usize) {
                        let slot = &mut s.slots[usize::from(id)];
                        if slot.live {
                            // The id came round while still unanswered: lost.
                            if measuring {
                                stats.lost += 1;
                            }
                            s.inflight -= 1;
                        }
                        *slot = Slot {
                            sent_ns: now,
                            name: name as u32,
                            live: true,
                        };
                        s.inflight += 1;
                        order.push_back((si as u16, id, now));
                    }
                    let r = r as u64;
                    sched_sent += r;
                    total_sent += r;
                    if measuring {
                        stats.sent += r;
                    }
                    // Unsent ones: their names are simply skipped this round.
                }
            }
        }

        // Receive on every socket.
        for s in socks.iter_mut() {
            // SAFETY: in_hdr/in_iov/in_bufs stay alive and unmoved for the call; the kernel
            // writes at most MAX_MSG bytes per buffer and the lengths into msg_len.
            let r = unsafe {
                libc::recvmmsg(
                    s.sock.as_raw_fd(),
                    in_hdr.as_mut_ptr(),
                    batch as libc::c_uint,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if r <= 0 {
                continue;
            }
            did = true;
            let now = ns_now(start);
            for k in 0..r as usize {
                let len = in_hdr[k].msg_len as usize;
                let b = &in_bufs[k][..len];
                if len < 2 {
                    continue;
                }
                let id = u16::from_be_bytes([b[0], b[1]]);
                let slot = &mut s.slots[usize::from(id)];
                if !slot.live {
                    continue; // late answer to a query already counted lost
                }
                slot.live = false;
                s.inflight -= 1;
                let name = &names[slot.name as usize];
                total_answered += 1;
                if !measuring {
                    continue;
                }
                if valid(&name.query, id, b, name.want) {
                    stats.answered += 1;
                    let us = ((now - slot.sent_ns) / 1000) as usize;
                    stats.hist[us.min(HIST_US)] += 1;
                } else {
                    stats.invalid += 1;
                    if invalid_examples.len() < 5 {
                        invalid_examples.push(
                            b.iter()
                                .take(64)
                                .map(|x| format!("{x:02x}"))
                                .collect::<String>(),
                        );
                    }
                }
            }
        }

        // Timeouts.
        let now = ns_now(start);
        if measuring && sending && now >= next_sample_ns {
            next_sample_ns = now + 10_000_000;
            let (srv, gen_) = udp_sockets(&ports);
            samples += 1;
            server_backlog += u64::from(srv.1 > 0);
            gen_backlog += u64::from(gen_.1 > 0);
            server_bytes += srv.1;
            gen_bytes += gen_.1;
        }
        while let Some(&(si, id, sent)) = order.front() {
            if now.saturating_sub(sent) < timeout_ns {
                break;
            }
            order.pop_front();
            let s = &mut socks[usize::from(si)];
            let slot = &mut s.slots[usize::from(id)];
            if slot.live && slot.sent_ns == sent {
                slot.live = false;
                s.inflight -= 1;
                if measuring {
                    stats.lost += 1;
                }
                did = true;
            }
        }

        if !did && sending {
            idle_ns += ns_now(start) - turn_start;
        }
    }

    let wall_all = start.elapsed().as_secs_f64();
    let cpu_all = cpu_seconds() - cpu0;
    let measured = (end_ns.saturating_sub(measure_start_ns)) as f64 / 1e9;
    let cpu_measured = cpu_seconds() - cpu_measure0;
    let s1 = s1.unwrap_or_else(|| sample(&args, &ports));
    let wall_measured = measured_wall_ns as f64 / 1e9;
    let server_cpu_s = match (s0.server, s1.server) {
        (Some(a), Some(b)) => Some((b - a) as f64 / 100.0),
        _ => None,
    };
    let (core_busy, core_irq) = match (s0.core, s1.core) {
        (Some((b0, t0, i0)), Some((b1, t1, i1))) if t1 > t0 => (
            Some((b1 - b0) as f64 / (t1 - t0) as f64),
            Some((i1 - i0) as f64 / (t1 - t0) as f64),
        ),
        _ => (None, None),
    };
    let loss_pct = if stats.sent > 0 {
        100.0 * (stats.lost as f64) / (stats.sent as f64)
    } else {
        0.0
    };
    let num = |x: f64| {
        if x.is_finite() {
            format!("{x:.3}")
        } else {
            "null".to_string()
        }
    };
    println!(
        "{{\"mode\":\"{}\",\"sockets\":{},\"batch\":{},\"window\":{},\"rate\":{},\
         \"duration_s\":{},\"sent\":{},\"answered\":{},\"invalid\":{},\"lost\":{},\
         \"loss_pct\":{},\"qps\":{},\"p50_us\":{},\"p99_us\":{},\"p999_us\":{},\
         \"idle_frac\":{},\"cpu_s\":{},\"total_sent\":{},\"total_answered\":{},\
         \"total_wall_s\":{},\"total_cpu_s\":{},\"server_cpu_s\":{},\"server_util\":{},\
         \"core_busy_frac\":{},\"core_irq_frac\":{},\"server_sock_drops\":{},\"gen_sock_drops\":{},\
         \"server_backlog_frac\":{},\"gen_backlog_frac\":{},\"server_queue_share\":{},\
         \"invalid_examples\":[{}]}}",
        if args.window.is_some() {
            "window"
        } else {
            "rate"
        },
        args.sockets,
        batch,
        args.window.map_or("null".into(), |w| w.to_string()),
        args.rate.map_or("null".into(), |r| format!("{r:.0}")),
        num(measured),
        stats.sent,
        stats.answered,
        stats.invalid,
        stats.lost,
        num(loss_pct),
        num(stats.answered as f64 / measured.max(1e-9)),
        num(stats.percentile_us(50.0)),
        num(stats.percentile_us(99.0)),
        num(stats.percentile_us(99.9)),
        num(idle_ns as f64 / 1e9 / measured.max(1e-9)),
        num(cpu_measured),
        total_sent,
        total_answered,
        num(wall_all),
        num(cpu_all),
        server_cpu_s.map_or("null".into(), num),
        server_cpu_s.map_or("null".into(), |c| num(c / wall_measured.max(1e-9))),
        core_busy.map_or("null".into(), num),
        core_irq.map_or("null".into(), num),
        s1.drops.0.saturating_sub(s0.drops.0),
        s1.drops.1.saturating_sub(s0.drops.1),
        num(server_backlog as f64 / samples.max(1) as f64),
        num(gen_backlog as f64 / samples.max(1) as f64),
        num(server_bytes as f64 / (server_bytes + gen_bytes).max(1) as f64),
        invalid_examples
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(",")
    );
}
