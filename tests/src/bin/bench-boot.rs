//! `bench-boot`: boot time of one image under Ferry's VMM, stock uhyve and
//! QEMU/KVM (PVH on microvm): process start to the guest's first console
//! line, and to process exit. Runs are interleaved so that machine noise
//! falls on all three alike; the table gives the median, the 10th-90th
//! percentile spread, and each median's ratio to Ferry's.
//!
//! Also writes `target/bench/boot.json`.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use ferry_tests::{ferry_run, image, qemu_run, root, uhyve_run};

#[derive(Parser)]
#[command(about = "Boot time of an image: Ferry vs uhyve vs QEMU")]
struct Args {
    /// Runs per VMM.
    #[arg(long, default_value_t = 20)]
    runs: usize,
    /// Image name under images/out.
    #[arg(long, default_value = "hello")]
    image: String,
    /// A std program on RustyHermit, booted by Ferry's VMM beside it (its
    /// `exit` argument: print one line, exit); empty to leave it out.
    #[arg(long, default_value = "hermit-probe")]
    hermit_image: String,
}

/// Builds the command that boots the image under one VMM.
type CommandFactory<'a> = Box<dyn Fn() -> Command + 'a>;

/// A VMM's name, how to boot the image under it, and which line counts as
/// the first (`None`: any).
type Vmm<'a> = (&'a str, CommandFactory<'a>, Option<&'a str>);

struct Sample {
    first_line: Duration,
    exit: Duration,
}

/// Runs `cmd` to its end: the time to the first console line (the first
/// one containing `marker`, if given) and to its exit.
fn measure(mut cmd: Command, marker: Option<&str>) -> anyhow::Result<Sample> {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("spawn")?;
    let mut out = child.stdout.take().expect("piped");
    let mut first_line = None;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = out.read(&mut buf)?;
        if n == 0 {
            break;
        }
        if first_line.is_none() {
            seen.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&seen);
            let done = text
                .split_inclusive('\n')
                .any(|l| l.ends_with('\n') && marker.is_none_or(|m| l.contains(m)));
            if done {
                first_line = Some(start.elapsed());
            }
        }
    }
    child.wait()?;
    let exit = start.elapsed();
    Ok(Sample {
        first_line: first_line.context("the guest printed no line")?,
        exit,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let img: PathBuf = image(&args.image);
    // The kernel may log a warning first: the app's own line counts.
    let hermit = (!args.hermit_image.is_empty()).then(|| image(&args.hermit_image));
    let mut vmms: Vec<Vmm<'_>> = vec![
        ("ferry", Box::new(|| ferry_run(&img, &[], &[])), None),
        ("uhyve", Box::new(|| uhyve_run(&img, &[])), None),
        ("qemu-microvm", Box::new(|| qemu_run(&img, &[])), None),
    ];
    if let Some(h) = &hermit {
        vmms.push((
            "ferry, hermit",
            Box::new(move || ferry_run(h, &[], &["exit"])),
            Some("std on RustyHermit"),
        ));
    }
    let mut samples: Vec<Vec<Sample>> = vmms.iter().map(|_| Vec::new()).collect();
    for run in 0..args.runs + 1 {
        for (i, (name, cmd, marker)) in vmms.iter().enumerate() {
            let s = measure(cmd(), *marker).with_context(|| format!("{name}, run {run}"))?;
            if run > 0 {
                samples[i].push(s); // run 0 warms caches, not counted
            }
        }
    }
    let stats: Vec<(&str, [Duration; 3], [Duration; 3])> = vmms
        .iter()
        .zip(&samples)
        .map(|((name, _, _), s)| {
            let mut first: Vec<Duration> = s.iter().map(|x| x.first_line).collect();
            let mut exit: Vec<Duration> = s.iter().map(|x| x.exit).collect();
            first.sort();
            exit.sort();
            let q = |v: &[Duration]| [percentile(v, 0.5), percentile(v, 0.1), percentile(v, 0.9)];
            (*name, q(&first), q(&exit))
        })
        .collect();
    let (ferry_first, ferry_exit) = (stats[0].1[0], stats[0].2[0]);
    println!(
        "boot of images/out/{} , {} runs each (interleaved), process start to:",
        args.image, args.runs
    );
    println!(
        "{:<14} {:>22} {:>8} {:>22} {:>8}",
        "vmm", "first line ms (p10-p90)", "ratio", "exit ms (p10-p90)", "ratio"
    );
    let mut json = Vec::new();
    for (name, f, e) in &stats {
        println!(
            "{:<14} {:>8.2} ({:>5.2}-{:>6.2}) {:>7.1}x {:>8.2} ({:>5.2}-{:>6.2}) {:>7.1}x",
            name,
            ms(f[0]),
            ms(f[1]),
            ms(f[2]),
            ms(f[0]) / ms(ferry_first),
            ms(e[0]),
            ms(e[1]),
            ms(e[2]),
            ms(e[0]) / ms(ferry_exit)
        );
        json.push(format!(
            "{{\"vmm\":\"{name}\",\"first_line_ms\":{{\"p50\":{:.3},\"p10\":{:.3},\"p90\":{:.3}}},\"exit_ms\":{{\"p50\":{:.3},\"p10\":{:.3},\"p90\":{:.3}}}}}",
            ms(f[0]),
            ms(f[1]),
            ms(f[2]),
            ms(e[0]),
            ms(e[1]),
            ms(e[2])
        ));
    }
    println!("(ratio: this VMM's median over Ferry's; higher means slower than Ferry)");
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("boot.json");
    std::fs::write(
        &path,
        format!(
            "{{\"image\":\"{}\",\"runs\":{},\"results\":[{}]}}\n",
            args.image,
            args.runs,
            json.join(",")
        ),
    )?;
    println!("wrote {}", path.display());
    Ok(())
}
