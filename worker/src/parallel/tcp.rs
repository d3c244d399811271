//! Collectives over TCP for CPU ranks on any hosts.
//!
//! Ranks form a full mesh (one connection per pair). Small all-reduces are one-shot: each rank
//! sends its whole tensor to every peer and reduces locally in rank order — one round trip,
//! bit-identical results everywhere. Large ones (≥ `ring_threshold` bytes, more than two
//! ranks) use a ring (reduce-scatter then all-gather), which moves 2(n-1)/n of the data per
//! rank instead of n-1 times it, at the cost of 2(n-1) round trips; each chunk is reduced by
//! one rank, so results stay identical everywhere. The threshold comes from the collectives
//! benchmark (`cargo bench -p neox-worker --bench decode`). Every read and write has a
//! deadline: a dead or stuck peer becomes an error, never a hang.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::{Communicator, ParallelError, RankInfo};

/// Messages at most this large are written inline: kernel socket buffers absorb them, so two
/// ranks writing to each other at once cannot deadlock. Larger ones are written from a
/// helper thread while this thread reads.
const INLINE_WRITE_MAX: usize = 64 * 1024;

pub struct TcpCommunicator {
    rank: RankInfo,
    /// `peers[r]` is the connection to rank `r` (`None` for ourselves), as separate read and
    /// write handles so a large send and a receive can proceed at once.
    peers: Vec<Option<(Mutex<TcpStream>, Mutex<TcpStream>)>>,
    timeout: Duration,
    seq: AtomicU64,
    /// All-reduces of at least this many bytes use the ring (with more than two ranks).
    ring_threshold: usize,
}

/// Default switch-over from one-shot to ring all-reduce (groups of more than two ranks).
/// Measured with the release build, 4 ranks on loopback (`cargo bench -p neox-worker --bench
/// decode`): one-shot wins up to 192 KiB (636 µs against the ring's 1148), the ring from
/// 384 KiB (1.09 ms against 4.4) — decode steps stay one-shot, long prefills use the ring.
pub const DEFAULT_RING_THRESHOLD: usize = 256 << 10;

fn io_err(op: &'static str, peer: usize, timeout: Duration, e: std::io::Error) -> ParallelError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => ParallelError::Timeout {
            op,
            peer,
            secs: timeout.as_secs_f64(),
        },
        _ => ParallelError::PeerLost {
            op,
            peer,
            message: e.to_string(),
        },
    }
}

impl TcpCommunicator {
    /// Connects this rank to every other: rank `i` dials every `j < i` (retrying until
    /// `timeout`) and accepts every `j > i` on `listener`. `addrs[r]` is rank r's listener.
    pub fn connect_mesh(
        rank: RankInfo,
        listener: TcpListener,
        addrs: &[String],
        timeout: Duration,
    ) -> Result<Self, ParallelError> {
        if addrs.len() != rank.world_size {
            return Err(ParallelError::Rendezvous(format!(
                "{} collective addresses for a world of {}",
                addrs.len(),
                rank.world_size
            )));
        }
        let deadline = Instant::now() + timeout;
        let mut peers: Vec<Option<TcpStream>> = (0..rank.world_size).map(|_| None).collect();
        for (j, addr) in addrs.iter().enumerate().take(rank.rank) {
            let mut s = dial(addr, deadline).map_err(|e| {
                ParallelError::Rendezvous(format!("rank {} cannot reach rank {j} at {addr}: {e}", rank.rank))
            })?;
            s.write_all(&(rank.rank as u32).to_le_bytes())
                .map_err(|e| ParallelError::Rendezvous(format!("handshake with rank {j}: {e}")))?;
            peers[j] = Some(s);
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| ParallelError::Rendezvous(e.to_string()))?;
        let mut missing = rank.world_size - rank.rank - 1;
        while missing > 0 {
            match listener.accept() {
                Ok((mut s, from)) => {
                    s.set_nonblocking(false)
                        .map_err(|e| ParallelError::Rendezvous(e.to_string()))?;
                    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b)
                        .map_err(|e| ParallelError::Rendezvous(format!("handshake from {from}: {e}")))?;
                    let j = u32::from_le_bytes(b) as usize;
                    if j <= rank.rank || j >= rank.world_size || peers[j].is_some() {
                        return Err(ParallelError::Rendezvous(format!(
                            "unexpected peer rank {j} from {from}"
                        )));
                    }
                    peers[j] = Some(s);
                    missing -= 1;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if Instant::now() > deadline {
                        return Err(ParallelError::Rendezvous(format!(
                            "rank {}: {missing} higher ranks did not connect within {:.0}s",
                            rank.rank,
                            timeout.as_secs_f64()
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(ParallelError::Rendezvous(format!("accept: {e}"))),
            }
        }
        let mut out = Vec::with_capacity(peers.len());
        for p in peers {
            out.push(match p {
                Some(s) => {
                    s.set_nodelay(true).ok();
                    s.set_read_timeout(Some(timeout)).ok();
                    s.set_write_timeout(Some(timeout)).ok();
                    let w = s
                        .try_clone()
                        .map_err(|e| ParallelError::Rendezvous(format!("socket clone: {e}")))?;
                    Some((Mutex::new(s), Mutex::new(w)))
                }
                None => None,
            });
        }
        Ok(Self {
            rank,
            peers: out,
            timeout,
            seq: AtomicU64::new(0),
            ring_threshold: DEFAULT_RING_THRESHOLD,
        })
    }

    /// Sets the size from which all-reduces use the ring (0: always, `usize::MAX`: never).
    pub fn with_ring_threshold(mut self, bytes: usize) -> Self {
        self.ring_threshold = bytes;
        self
    }

    /// Sends `payload` to `to` while receiving from `from`, both under collective `seq`.
    fn send_recv(
        &self,
        op: &'static str,
        to: usize,
        from: usize,
        seq: u64,
        payload: &[u8],
    ) -> Result<Vec<u8>, ParallelError> {
        std::thread::scope(|sc| {
            let writer = sc.spawn(|| self.send(op, to, seq, payload));
            let got = self.recv(op, from, seq);
            let sent = writer.join().map_err(|_| ParallelError::PeerLost {
                op,
                peer: to,
                message: "writer panicked".into(),
            })?;
            sent?;
            got
        })
    }

    /// Ring all-reduce (sum) of `data` in place.
    fn ring_all_reduce(&self, data: &mut [f32]) -> Result<(), ParallelError> {
        const OP: &str = "all_reduce(ring)";
        let (n, r) = (self.rank.world_size, self.rank.rank);
        let (next, prev) = ((r + 1) % n, (r + n - 1) % n);
        let len = data.len();
        let bounds = |c: usize| (c * len / n, (c + 1) * len / n);
        let to_bytes = |s: &[f32]| s.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
        let bad = |got: usize, want: usize| ParallelError::PeerLost {
            op: OP,
            peer: prev,
            message: format!("chunk of {got} bytes, expected {want}"),
        };
        // Reduce-scatter: after n-1 steps rank r holds the full sum of chunk r+1.
        for step in 0..n - 1 {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst);
            let (s0, s1) = bounds((r + n - step) % n);
            let got = self.send_recv(OP, next, prev, seq, &to_bytes(&data[s0..s1]))?;
            let (a, b) = bounds((r + 2 * n - step - 1) % n);
            if got.len() != (b - a) * 4 {
                return Err(bad(got.len(), (b - a) * 4));
            }
            for (x, c) in data[a..b].iter_mut().zip(got.chunks_exact(4)) {
                *x += f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        // All-gather the reduced chunks around the ring.
        for step in 0..n - 1 {
            let seq = self.seq.fetch_add(1, Ordering::SeqCst);
            let (s0, s1) = bounds((r + 1 + n - step) % n);
            let got = self.send_recv(OP, next, prev, seq, &to_bytes(&data[s0..s1]))?;
            let (a, b) = bounds((r + n - step) % n);
            if got.len() != (b - a) * 4 {
                return Err(bad(got.len(), (b - a) * 4));
            }
            for (x, c) in data[a..b].iter_mut().zip(got.chunks_exact(4)) {
                *x = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
            }
        }
        Ok(())
    }

    fn peer(&self, r: usize, write: bool) -> Result<std::sync::MutexGuard<'_, TcpStream>, ParallelError> {
        let (rd, wr) = self
            .peers
            .get(r)
            .and_then(|p| p.as_ref())
            .ok_or_else(|| ParallelError::Rendezvous(format!("no connection to rank {r}")))?;
        if write { wr } else { rd }.lock().map_err(|_| ParallelError::PeerLost {
            op: "lock",
            peer: r,
            message: "poisoned".into(),
        })
    }

    fn send(&self, op: &'static str, r: usize, seq: u64, payload: &[u8]) -> Result<(), ParallelError> {
        let mut s = self.peer(r, true)?;
        let mut header = [0u8; 16];
        header[..8].copy_from_slice(&seq.to_le_bytes());
        header[8..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        s.write_all(&header)
            .and_then(|_| s.write_all(payload))
            .map_err(|e| io_err(op, r, self.timeout, e))
    }

    fn recv(&self, op: &'static str, r: usize, seq: u64) -> Result<Vec<u8>, ParallelError> {
        let mut s = self.peer(r, false)?;
        let mut header = [0u8; 16];
        s.read_exact(&mut header).map_err(|e| io_err(op, r, self.timeout, e))?;
        let got_seq = u64::from_le_bytes(header[..8].try_into().unwrap_or_default());
        let len = u64::from_le_bytes(header[8..].try_into().unwrap_or_default()) as usize;
        if got_seq != seq {
            return Err(ParallelError::PeerLost {
                op,
                peer: r,
                message: format!("out of step: expected collective #{seq}, peer sent #{got_seq}"),
            });
        }
        if len > 1 << 32 {
            return Err(ParallelError::PeerLost {
                op,
                peer: r,
                message: format!("absurd message of {len} bytes"),
            });
        }
        let mut buf = vec![0u8; len];
        s.read_exact(&mut buf).map_err(|e| io_err(op, r, self.timeout, e))?;
        Ok(buf)
    }

    /// Sends `mine` to every peer and returns every rank's payload, in rank order.
    fn exchange(&self, op: &'static str, mine: Vec<u8>) -> Result<Vec<Vec<u8>>, ParallelError> {
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        let me = self.rank.rank;
        let others: Vec<usize> = (0..self.rank.world_size).filter(|&r| r != me).collect();
        let mut got: Vec<Vec<u8>> = vec![Vec::new(); self.rank.world_size];
        if mine.len() <= INLINE_WRITE_MAX {
            for &r in &others {
                self.send(op, r, seq, &mine)?;
            }
            for &r in &others {
                got[r] = self.recv(op, r, seq)?;
            }
        } else {
            std::thread::scope(|sc| -> Result<(), ParallelError> {
                let writer = sc.spawn(|| others.iter().try_for_each(|&r| self.send(op, r, seq, &mine)));
                for &r in &others {
                    got[r] = self.recv(op, r, seq)?;
                }
                writer.join().map_err(|_| ParallelError::PeerLost {
                    op,
                    peer: me,
                    message: "writer panicked".into(),
                })?
            })?;
        }
        got[me] = mine;
        Ok(got)
    }
}

fn dial(addr: &str, deadline: Instant) -> std::io::Result<TcpStream> {
    loop {
        let target: Option<SocketAddr> = addr.to_socket_addrs().ok().and_then(|mut a| a.next());
        let res = match target {
            Some(t) => TcpStream::connect_timeout(&t, Duration::from_secs(2)),
            None => Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("cannot resolve {addr}"),
            )),
        };
        match res {
            Ok(s) => return Ok(s),
            Err(e) if Instant::now() > deadline => return Err(e),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn tensor_err(op: &'static str) -> impl Fn(candle_core::Error) -> ParallelError {
    move |e| ParallelError::Tensor {
        op,
        message: e.to_string(),
    }
}

pub(crate) fn tensor_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => flat.to_vec1::<f32>()?.iter().flat_map(|x| x.to_le_bytes()).collect(),
        DType::F16 => flat
            .to_vec1::<half::f16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        DType::BF16 => flat
            .to_vec1::<half::bf16>()?
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
        other => candle_core::bail!("collectives do not support {other:?}"),
    })
}

impl Communicator for TcpCommunicator {
    fn rank_info(&self) -> RankInfo {
        self.rank
    }

    fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor, ParallelError> {
        const OP: &str = "all_reduce";
        if self.rank.world_size > 2 && t.elem_count() * t.dtype().size_in_bytes() >= self.ring_threshold {
            let f = t
                .flatten_all()
                .and_then(|x| x.to_dtype(DType::F32))
                .map_err(tensor_err(OP))?;
            let mut v: Vec<f32> = f.to_vec1().map_err(tensor_err(OP))?;
            self.ring_all_reduce(&mut v)?;
            return Tensor::from_vec(v, t.dims(), &Device::Cpu)
                .and_then(|x| x.to_dtype(t.dtype()))
                .and_then(|x| x.to_device(t.device()))
                .map_err(tensor_err(OP));
        }
        let parts = self.exchange(OP, tensor_bytes(t).map_err(tensor_err(OP))?)?;
        let mut sum: Option<Tensor> = None;
        for (r, p) in parts.iter().enumerate() {
            let x =
                Tensor::from_raw_buffer(p, t.dtype(), t.dims(), &Device::Cpu).map_err(|e| ParallelError::PeerLost {
                    op: OP,
                    peer: r,
                    message: format!("bad payload: {e}"),
                })?;
            // Same order on every rank: identical results everywhere.
            sum = Some(match sum {
                None => x,
                Some(s) => (s + x).map_err(tensor_err(OP))?,
            });
        }
        let sum = sum.ok_or_else(|| ParallelError::Tensor {
            op: OP,
            message: "empty group".into(),
        })?;
        sum.to_device(t.device()).map_err(tensor_err(OP))
    }

    fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor, ParallelError> {
        const OP: &str = "all_gather";
        let parts = self.exchange(OP, tensor_bytes(t).map_err(tensor_err(OP))?)?;
        let tensors = parts
            .iter()
            .enumerate()
            .map(|(r, p)| {
                Tensor::from_raw_buffer(p, t.dtype(), t.dims(), &Device::Cpu).map_err(|e| ParallelError::PeerLost {
                    op: OP,
                    peer: r,
                    message: format!("bad payload: {e}"),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Tensor::cat(&tensors, dim)
            .and_then(|x| x.to_device(t.device()))
            .map_err(tensor_err(OP))
    }

    fn broadcast_bytes(&self, data: Vec<u8>) -> Result<Vec<u8>, ParallelError> {
        const OP: &str = "broadcast";
        let seq = self.seq.fetch_add(1, Ordering::SeqCst);
        if self.rank.rank == 0 {
            for r in 1..self.rank.world_size {
                self.send(OP, r, seq, &data)?;
            }
            Ok(data)
        } else {
            self.recv(OP, 0, seq)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `n` ranks in threads of this process, over real loopback sockets.
    fn group(n: usize, timeout: Duration) -> Vec<TcpCommunicator> {
        let listeners: Vec<TcpListener> = (0..n).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
        let addrs: Vec<String> = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(r, l)| {
                let addrs = addrs.clone();
                std::thread::spawn(move || {
                    TcpCommunicator::connect_mesh(RankInfo { rank: r, world_size: n }, l, &addrs, timeout).unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_all_gather_broadcast_over_loopback() {
        for n in [2, 3, 4] {
            let comms = group(n, Duration::from_secs(10));
            let results: Vec<_> = std::thread::scope(|s| {
                let hs: Vec<_> = comms
                    .iter()
                    .map(|c| {
                        s.spawn(move || {
                            let r = c.rank_info().rank as f32;
                            // Small (inline) and large (threaded writer) messages.
                            let small = Tensor::new(&[r, 10.0 * r], &Device::Cpu).unwrap();
                            let big = Tensor::full(r, 100_000, &Device::Cpu).unwrap();
                            let s1 = c.all_reduce_sum(&small).unwrap().to_vec1::<f32>().unwrap();
                            let s2 = c.all_reduce_sum(&big).unwrap().to_vec1::<f32>().unwrap();
                            let g = c
                                .all_gather(&small.unsqueeze(0).unwrap(), 1)
                                .unwrap()
                                .to_vec2::<f32>()
                                .unwrap();
                            let b = c.broadcast_bytes(vec![c.rank_info().rank as u8; 3]).unwrap();
                            c.barrier().unwrap();
                            (s1, s2[0], s2[99_999], g, b)
                        })
                    })
                    .collect();
                hs.into_iter().map(|h| h.join().unwrap()).collect()
            });
            let total: f32 = (0..n).map(|r| r as f32).sum();
            for (s1, b0, b1, g, b) in results {
                assert_eq!(s1, vec![total, 10.0 * total]);
                assert_eq!((b0, b1), (total, total));
                let want: Vec<f32> = (0..n).flat_map(|r| [r as f32, 10.0 * r as f32]).collect();
                assert_eq!(g, vec![want]);
                assert_eq!(b, vec![0u8; 3]);
            }
        }
    }

    #[test]
    fn ring_and_one_shot_all_reduce_agree_on_every_rank() {
        for n in [3, 4] {
            for threshold in [0, usize::MAX] {
                let comms: Vec<_> = group(n, Duration::from_secs(10))
                    .into_iter()
                    .map(|c| c.with_ring_threshold(threshold))
                    .collect();
                let results: Vec<Vec<f32>> = std::thread::scope(|s| {
                    let hs: Vec<_> = comms
                        .iter()
                        .map(|c| {
                            s.spawn(move || {
                                let r = c.rank_info().rank;
                                // An odd length, so ring chunks are uneven.
                                let v: Vec<f32> = (0..1001).map(|i| ((i * (r + 1)) % 17) as f32 * 0.25).collect();
                                let t = Tensor::from_vec(v, (7, 143), &Device::Cpu).unwrap();
                                c.all_reduce_sum(&t)
                                    .unwrap()
                                    .flatten_all()
                                    .unwrap()
                                    .to_vec1::<f32>()
                                    .unwrap()
                            })
                        })
                        .collect();
                    hs.into_iter().map(|h| h.join().unwrap()).collect()
                });
                let want: Vec<f32> = (0..1001)
                    .map(|i| (0..n).map(|r| ((i * (r + 1)) % 17) as f32 * 0.25).sum())
                    .collect();
                for got in &results {
                    assert_eq!(got, &results[0], "ranks disagree (n {n}, threshold {threshold})");
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4, "n {n}, threshold {threshold}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn dead_or_silent_peer_is_an_error_not_a_hang() {
        let mut comms = group(2, Duration::from_millis(300));
        let t = Tensor::new(&[1f32], &Device::Cpu).unwrap();
        // Rank 1 alive but silent: rank 0 times out.
        let t0 = Instant::now();
        let e = comms[0].all_reduce_sum(&t).unwrap_err();
        assert!(matches!(e, ParallelError::Timeout { peer: 1, .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        // Rank 0 gone: rank 1 sees the peer lost at once.
        comms.truncate(1);
        let c0 = comms.pop().unwrap();
        drop(c0);
        let c = group(2, Duration::from_secs(30));
        let mut it = c.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        drop(a);
        let t0 = Instant::now();
        let e = b.all_reduce_sum(&t).unwrap_err();
        assert!(matches!(e, ParallelError::PeerLost { peer: 0, .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
