//! Storage vMotion: mirror a disk image while the guest keeps writing to it.
//!
//! A virtio-blk device (vdevices, served by its event loop) backs onto a fresh image in the temp
//! directory; the virtio driver harness plays the guest and writes random extents through the
//! device. Meanwhile a `vmigrate::DiskMirror` copies the image to a second file: bulk copy,
//! passes over the blocks the guest dirtied, then synchronous mirroring of each write. Once the
//! mirror is ready the guest writes on (each write now mirrored before it completes); then the
//! two images are compared byte for byte, and the device switches to the copy between two
//! requests: the guest writes on, into the copy only, and the source image is left as it was.
//! No KVM, kernel or flags needed.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use clap::Parser;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use vinfra::vcore::vm_memory::{Bytes, GuestAddress};
use vinfra::vcore::{Snapshot, StateError};
use vinfra::vdevices::testing::{DESC_F_WRITE, Driver, guest_memory};
use vinfra::vdevices::virtio::block::{Block, BlockConfig, req};
use vinfra::vdevices::{DeviceState, EventLoop, MmioTransport};
use vinfra::vmigrate::storage::RemoteStats;
use vinfra::vmigrate::transport::{DEFAULT_PEER_TIMEOUT, tcp_accept, tcp_connect};
use vinfra::vmigrate::{DiskMirror, RemoteImage, serve_image};

/// Mirror a disk image under guest writes (Storage vMotion) and check the copy.
#[derive(Parser, Debug)]
#[command(
    version,
    about = "Storage vMotion: mirror a disk image while the guest writes to it, then compare the copy"
)]
struct Cli {
    /// Image size in MiB.
    #[arg(long, default_value_t = 256)]
    size_mib: u64,
    /// Mirror block size in KiB (1 to 16384).
    #[arg(long, default_value_t = 64)]
    block_kib: u32,
    /// Passes over dirty blocks before switching to synchronous mirroring.
    #[arg(long, default_value_t = 4)]
    max_passes: u32,
    /// Guest writes once the mirror is ready (each mirrored before it completes).
    #[arg(long, default_value_t = 500)]
    writes_after_ready: u64,
    /// Guest writes after the device switched to the copy.
    #[arg(long, default_value_t = 100)]
    writes_after_switch: u64,
    /// Largest guest write in KiB (each is 4 KiB to this, 4 KiB aligned).
    #[arg(long, default_value_t = 256)]
    max_write_kib: u64,
    /// Mirror to an image host over loopback TCP instead of to a local file: `serve_image`
    /// runs in a thread of this process, standing in for the other host; every mirrored write
    /// waits for its acknowledgement.
    #[arg(long)]
    remote: bool,
    /// Print the summary as one JSON object on stdout (nothing else goes to stdout).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Debug, Default)]
struct Summary {
    size_mib: u64,
    block_kib: u32,
    time_to_ready_ms: f64,
    bulk_and_passes_mib_s: f64,
    blocks_copied: u64,
    dirty_passes: u32,
    writes_before_ready: u64,
    writes_after_ready: u64,
    writes_mirrored: u64,
    /// Bytes the image host wrote (with --remote).
    remote_bytes: Option<u64>,
    guest_write_mean_us: f64,
    images_equal: bool,
    switch_us: f64,
    writes_after_switch: u64,
    source_untouched_after_switch: bool,
    copy_has_every_write: bool,
}

/// splitmix64: reproducible offsets, lengths and contents.
fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Removes the two images however the run ends.
struct Images(PathBuf, PathBuf);

impl Drop for Images {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(&self.1);
    }
}

/// One guest write of `len` bytes of `fill` at byte `offset`, through the device.
fn guest_write(d: &mut Driver, bufs: (u64, u64, u64), offset: u64, len: u32, fill: u8) -> Result<()> {
    let (h, data, st) = bufs;
    let mut hdr = req::OUT.to_le_bytes().to_vec();
    hdr.extend_from_slice(&[0; 4]);
    hdr.extend_from_slice(&(offset / 512).to_le_bytes());
    d.mem().write_slice(&hdr, GuestAddress(h))?;
    d.mem().write_slice(&vec![fill; len as usize], GuestAddress(data))?;
    let head = d.post_raw(0, &[(h, 16, 0), (data, len, 0), (st, 1, DESC_F_WRITE)])?;
    d.kick(0).unwrap();
    d.wait_head(0, head, Duration::from_secs(10))?;
    ensure!(d.mem().read_obj::<u8>(GuestAddress(st))? == 0, "the device failed a write");
    Ok(())
}

fn run(cli: &Cli) -> Result<Summary> {
    let size = cli.size_mib << 20;
    ensure!(size > 0 && cli.max_write_kib >= 4, "--size-mib and --max-write-kib must be positive");
    let dir = std::env::temp_dir();
    let id = std::process::id();
    let images =
        Images(dir.join(format!("svmotion-{id}-src.img")), dir.join(format!("svmotion-{id}-dst.img")));
    let mut f = File::create(&images.0).context("creating the source image")?;
    let chunk: Vec<u8> = (0..1usize << 20).map(|i| (i * 13 + i / 4096) as u8).collect();
    for _ in 0..cli.size_mib {
        f.write_all(&chunk)?;
    }
    drop(f);

    let block_size = cli.block_kib.saturating_mul(1024);
    let mut image_host = None;
    let mirror = if cli.remote {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?.to_string();
        let dst = images.1.clone();
        image_host = Some(std::thread::spawn(move || -> Result<RemoteStats> {
            Ok(serve_image(tcp_accept(&listener, DEFAULT_PEER_TIMEOUT)?, &dst)?)
        }));
        let conn = tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).context("connecting to the image host")?;
        let target = RemoteImage::connect(conn, size, &addr)?;
        DiskMirror::to_target(&images.0, Box::new(target), block_size)?
    } else {
        DiskMirror::new(&images.0, &images.1, block_size)?
    };
    let block = Block::new(BlockConfig { path: images.0.clone(), read_only: false, id: "svmotion".into() })?
        .with_write_observer(mirror.observer());
    let mem = guest_memory(64);
    let transport = MmioTransport::new(mem.clone(), Box::new(block))?;
    let events = EventLoop::start()?;
    events.add(Arc::new(transport.clone()))?;
    let mut d = Driver::new(mem, transport)?;
    d.init(u64::MAX, 256)?;
    let max_write = cli.max_write_kib.min(1024) << 10;
    let bufs = (d.alloc(16)?, d.alloc(max_write)?, d.alloc(1)?);

    let bar = ProgressBar::new_spinner();
    if cli.json {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(ProgressStyle::with_template("{spinner} {msg}")?);
    let (copied, dirty) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut x = 42u64;
    let (mut before, mut after, mut write_time) = (0u64, 0u64, Duration::ZERO);
    let stats = std::thread::scope(|s| -> Result<_> {
        let copier = s.spawn(|| {
            mirror.run(cli.max_passes, |c, left| {
                copied.store(c, Ordering::Relaxed);
                dirty.store(left, Ordering::Relaxed);
            })
        });
        while after < cli.writes_after_ready {
            let len = (next(&mut x) % (max_write / 4096) + 1) * 4096;
            let offset = (next(&mut x) % ((size.saturating_sub(len)) / 4096 + 1)) * 4096;
            let t = Instant::now();
            guest_write(&mut d, bufs, offset, len as u32, next(&mut x) as u8)?;
            write_time += t.elapsed();
            if mirror.is_ready() {
                after += 1;
            } else {
                before += 1;
                if copier.is_finished() {
                    break; // it failed: join below reports why
                }
            }
            bar.set_message(format!(
                "{} blocks copied, {} dirty after the last pass, {} guest writes ({})",
                copied.load(Ordering::Relaxed),
                dirty.load(Ordering::Relaxed),
                before + after,
                if mirror.is_ready() { "ready: mirrored synchronously" } else { "copying" }
            ));
            bar.tick();
        }
        copier.join().map_err(|_| anyhow::anyhow!("the mirror thread panicked"))?.map_err(Into::into)
    })?;
    bar.finish_and_clear();
    mirror.check()?;
    mirror.sync()?; // on the image host too, before its copy is read
    let (src_at_switch, mut expect) = (std::fs::read(&images.0)?, std::fs::read(&images.1)?);
    let equal = src_at_switch == expect;

    // Switch-over: the device moves to the copy between two requests (under the transport's
    // lock, so the mirror sees every write up to then and none after).
    let transport = d.transport().clone();
    let t = Instant::now();
    transport.replace_device(|state| {
        mirror.check().map_err(|e| StateError::Device { device: "mirror".into(), reason: e.to_string() })?;
        let DeviceState::Block(mut b) = state else {
            return Err(StateError::Device {
                device: "svmotion".into(),
                reason: "not a block device".into(),
            });
        };
        b.config.path = images.1.clone();
        Ok(Box::new(Block::restore((), &b)?))
    })?;
    let switch_us = t.elapsed().as_secs_f64() * 1e6;
    for _ in 0..cli.writes_after_switch {
        let len = (next(&mut x) % (max_write / 4096) + 1) * 4096;
        let offset = (next(&mut x) % ((size.saturating_sub(len)) / 4096 + 1)) * 4096;
        let fill = next(&mut x) as u8;
        guest_write(&mut d, bufs, offset, len as u32, fill)?;
        expect[offset as usize..(offset + len) as usize].fill(fill);
    }
    drop(events);
    let source_untouched = std::fs::read(&images.0)? == src_at_switch;
    let copy_has_every_write = std::fs::read(&images.1)? == expect;
    let secs = stats.time_to_ready.as_secs_f64().max(1e-9);
    let writes_mirrored = mirror.writes_mirrored();
    // Closing the mirror ends the image host's session.
    drop(mirror);
    let remote_bytes = match image_host {
        Some(h) => Some(h.join().map_err(|_| anyhow::anyhow!("the image host panicked"))??.bytes),
        None => None,
    };
    Ok(Summary {
        size_mib: cli.size_mib,
        block_kib: cli.block_kib,
        time_to_ready_ms: secs * 1e3,
        bulk_and_passes_mib_s: (stats.blocks_copied * u64::from(cli.block_kib)) as f64 / 1024.0 / secs,
        blocks_copied: stats.blocks_copied,
        dirty_passes: stats.dirty_passes,
        writes_before_ready: before,
        writes_after_ready: after,
        writes_mirrored,
        remote_bytes,
        guest_write_mean_us: write_time.as_secs_f64() * 1e6 / (before + after).max(1) as f64,
        images_equal: equal,
        switch_us,
        writes_after_switch: cli.writes_after_switch,
        source_untouched_after_switch: source_untouched,
        copy_has_every_write,
    })
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let s = run(&cli)?;
    if cli.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let rows = [
        ("image", format!("{} MiB, mirrored in {} KiB blocks", s.size_mib, s.block_kib)),
        (
            "time to ready",
            format!("{:.1} ms ({:.0} MiB/s copied)", s.time_to_ready_ms, s.bulk_and_passes_mib_s),
        ),
        (
            "blocks copied",
            format!("{} in the bulk copy and {} dirty passes", s.blocks_copied, s.dirty_passes),
        ),
        (
            "guest writes",
            format!("{} while copying, {} after ready", s.writes_before_ready, s.writes_after_ready),
        ),
        ("mirrored synchronously", s.writes_mirrored.to_string()),
        (
            "mirror target",
            match s.remote_bytes {
                Some(b) => {
                    format!("image host over loopback TCP, {:.1} MiB written there", b as f64 / 1048576.0)
                }
                None => "local file".into(),
            },
        ),
        ("guest write latency", format!("{:.1} µs mean (notify to used ring)", s.guest_write_mean_us)),
        ("images equal", if s.images_equal { "yes".into() } else { "NO".into() }),
        (
            "switch to the copy",
            format!(
                "{:.0} µs; then {} guest writes: source {}, copy {}",
                s.switch_us,
                s.writes_after_switch,
                if s.source_untouched_after_switch { "untouched" } else { "CHANGED" },
                if s.copy_has_every_write { "has every write" } else { "MISSES WRITES" }
            ),
        ),
    ];
    println!("\nsvmotion");
    println!("{:-<80}", "");
    for (k, v) in rows {
        println!("{k:<24} {v}");
    }
    ensure!(s.images_equal, "the mirror differs from the source image");
    ensure!(
        s.source_untouched_after_switch && s.copy_has_every_write,
        "the switch to the copy lost or misplaced writes"
    );
    Ok(())
}
