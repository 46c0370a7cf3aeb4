//! What every lesson binary shares: the common flags, the run context, output writers and progress bars.
//!
//! Library code never prints; lessons (binaries) own the terminal. Errors that a user can cause (a flag, a file)
//! come back as `anyhow::Error` with context, and [`lesson_main`] prints them on one line and exits with status 2.
use anyhow::{bail, ensure, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::{Path, PathBuf};
use tch::Device;

/// Flags shared by every lesson; flattened into each lesson's own clap struct.
#[derive(clap::Args, Debug, Clone)]
pub struct CommonArgs {
    /// Small budget so the lesson finishes in under a minute on 2 cores (the test suite uses it).
    #[arg(long)]
    pub quick: bool,
    /// Output directory for figures, loss.csv and metrics.json [default: out/lessonNN].
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Seed for every random number in the run; the same seed gives bit-identical outputs on CPU.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Threads libtorch may use [default: all cores].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..=1024))]
    pub threads: Option<i32>,
    /// Where to compute: cpu or cuda (cuda needs a CUDA libtorch and a GPU).
    #[arg(long, default_value = "cpu", value_parser = parse_device)]
    pub device: DeviceArg,
    /// Directory with the four MNIST .gz files [default: $SCRATCH_DIFFUSION_MNIST, else data/mnist].
    #[arg(long, value_name = "DIR", env = "SCRATCH_DIFFUSION_MNIST")]
    pub data_dir: Option<PathBuf>,
}

/// The `--device` value, checked when the run starts (a CUDA request on a machine without a GPU is an error).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceArg {
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The libtorch device, or an error when CUDA is asked for and there is none.
    pub fn resolve(self) -> Result<Device> {
        match self {
            DeviceArg::Cpu => Ok(Device::Cpu),
            DeviceArg::Cuda if tch::Cuda::is_available() => Ok(Device::Cuda(0)),
            DeviceArg::Cuda => {
                bail!("--device cuda was asked for, but libtorch sees no CUDA GPU here: use --device cpu")
            }
        }
    }
}

/// The clap value parser of `--device`.
pub fn parse_device(s: &str) -> std::result::Result<DeviceArg, String> {
    match s.to_ascii_lowercase().as_str() {
        "cpu" => Ok(DeviceArg::Cpu),
        "cuda" | "gpu" => Ok(DeviceArg::Cuda),
        other => Err(format!("unknown device '{other}': use cpu or cuda")),
    }
}

/// A clap value parser for flags that must be a positive, finite number (learning rates, step sizes, noise levels).
pub fn positive(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v > 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a positive number")),
    }
}

/// A clap value parser for weights and other flags that must be a finite number ≥ 0.
pub fn non_negative(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v >= 0.0 && v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a number ≥ 0")),
    }
}

/// A clap value parser for flags that take any finite number (guidance scales).
pub fn finite(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        _ => Err(format!("'{s}' is not a finite number")),
    }
}

/// A clap value parser for probabilities and fractions: a number in [0, 1].
pub fn unit_interval(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.0..=1.0).contains(&v) => Ok(v),
        _ => Err(format!("'{s}' is not a number in [0, 1]")),
    }
}

/// A lesson run: where outputs go, the device, the seed and the budget.
#[derive(Debug, Clone)]
pub struct Run {
    pub lesson: String,
    pub out: PathBuf,
    pub device: Device,
    pub seed: u64,
    pub quick: bool,
    pub data_dir: PathBuf,
    started: std::time::Instant,
    started_at: std::time::SystemTime,
    stamp: RunStamp,
}

impl CommonArgs {
    /// Validates the flags, creates the output directory, seeds libtorch and sets its thread count.
    pub fn init(&self, lesson: &str) -> Result<Run> {
        let out = self.out.clone().unwrap_or_else(|| PathBuf::from("out").join(lesson));
        ensure_writable_dir(&out)?;
        let device = self.device.resolve()?;
        if let Some(n) = self.threads {
            tch::set_num_threads(n);
        }
        tch::manual_seed(self.seed as i64);
        Ok(Run {
            lesson: lesson.to_string(),
            out,
            device,
            seed: self.seed,
            quick: self.quick,
            data_dir: self.data_dir.clone().unwrap_or_else(|| shipped_path(MNIST_DIR, MNIST_TRAIN_IMAGES)),
            started: std::time::Instant::now(),
            started_at: std::time::SystemTime::now(),
            stamp: RunStamp::now(lesson, self.seed),
        })
    }
}

/// Creates `dir` (and parents) and proves it is writable, so a bad `--out` fails before any training starts.
pub fn ensure_writable_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}: choose another with --out DIR", dir.display()))?;
    let probe = dir.join(".write-test");
    std::fs::write(&probe, b"ok").with_context(|| {
        format!("output directory {} is not writable: choose another with --out DIR", dir.display())
    })?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

/// Writes `bytes` to `path` atomically (see [`replace_atomically`]): after a crash `path` holds the old bytes or the
/// new ones, never a half-written file.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    replace_atomically(path, "", |tmp| {
        let mut f = std::fs::File::create(tmp)?;
        f.write_all(bytes)?;
        Ok(f.sync_all()?)
    })
}

/// Replaces `path` with what `write` puts into a temporary file beside it (`.NAME.tmpPID` + `suffix`; `write` must
/// flush it to the disk): the temporary file is renamed over `path`, then the directory is synced, so the rename
/// itself survives a crash. On every error the temporary file is removed; a directory given as `path` is refused.
pub fn replace_atomically(path: &Path, suffix: &str, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    anyhow::ensure!(!path.is_dir(), "{} is a directory: give the path of a file to write", path.display());
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp{}{suffix}", std::process::id()));
    let written = write(&tmp)
        .with_context(|| format!("cannot write {} (is the disk full, or the folder read-only?)", tmp.display()))
        .and_then(|_| {
            std::fs::rename(&tmp, path).with_context(|| format!("cannot move {} to {}", tmp.display(), path.display()))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp); // never leave a half-written file behind
        return Err(e);
    }
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all(); // some filesystems refuse fsync on a directory; the file itself is already safe
    }
    Ok(())
}

impl Run {
    /// Path of an output file inside the run's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.out.join(name)
    }

    /// Seconds since [`CommonArgs::init`].
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    /// Who made this run's outputs ([`RunStamp`]).
    pub fn stamp(&self) -> &RunStamp {
        &self.stamp
    }

    /// Writes `metrics.json` (pretty-printed, atomically), adding the lesson name, seed, budget, wall time and the
    /// run's stamp (`run`); then `run.json`, the stamp with the SHA-256 of every file this run wrote into its
    /// directory ([`write_manifest`]). Lessons call it last.
    pub fn write_metrics(&self, mut metrics: serde_json::Value) -> Result<PathBuf> {
        if let Some(obj) = metrics.as_object_mut() {
            obj.insert("lesson".into(), self.lesson.clone().into());
            obj.insert("seed".into(), self.seed.into());
            obj.insert("quick".into(), self.quick.into());
            obj.insert("threads".into(), tch::get_num_threads().into());
            obj.insert("wall_time_s".into(), ((self.elapsed_s() * 10.0).round() / 10.0).into());
            obj.insert("run".into(), serde_json::to_value(&self.stamp)?);
        }
        let path = self.path("metrics.json");
        write_atomic(&path, serde_json::to_string_pretty(&metrics)?.as_bytes())?;
        write_manifest(&self.out, &self.stamp, self.started_at)?;
        Ok(path)
    }

    /// Writes `results.md`: the run's stamp as an HTML comment, then each (anchor, markdown) section between mdBook
    /// `ANCHOR` comments, so a chapter includes one table with `{{#include figures/lessonNN/results.md:anchor}}`.
    pub fn write_results(&self, sections: &[(&str, String)]) -> Result<PathBuf> {
        let path = self.path("results.md");
        write_atomic(&path, results_markdown(&self.stamp, sections)?.as_bytes())?;
        Ok(path)
    }

    /// Writes a loss log as CSV with a header: `step,<column>...`.
    pub fn write_loss_csv(&self, name: &str, columns: &[&str], rows: &[(usize, Vec<f64>)]) -> Result<PathBuf> {
        let mut s = format!("step,{}\n", columns.join(","));
        for (step, vals) in rows {
            let vals: Vec<String> = vals.iter().map(|v| format!("{v:.6e}")).collect();
            s.push_str(&format!("{step},{}\n", vals.join(",")));
        }
        let path = self.path(name);
        write_atomic(&path, s.as_bytes())?;
        Ok(path)
    }

    /// A training run's loss, one value per step: `loss.csv` (one column, `column`) and `loss.png` (one curve,
    /// `label`, under `title`).
    pub fn write_loss(&self, title: &str, (column, label): (&str, &str), losses: &[f64]) -> Result<()> {
        let rows: Vec<(usize, Vec<f64>)> = losses.iter().enumerate().map(|(i, l)| (i, vec![*l])).collect();
        self.write_loss_csv("loss.csv", &[column], &rows)?;
        crate::plot::loss_curve(&self.path("loss.png"), title, &[(label, losses)])
    }
}

/// Who made a run's outputs, and where: written into metrics.json (`run`), at the top of results.md and into
/// run.json beside the files' hashes, so that the book can show that a chapter's figures, tables and numbers come
/// from one run (tests/book.rs compares the three).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RunStamp {
    pub lesson: String,
    /// The command line, the program by its file name: `lesson04 --threads 2 --out /tmp/full04`.
    pub command: String,
    pub seed: u64,
    /// `git rev-parse --short=12 HEAD` of the crate, with `+changes` when its code, build files or shipped data
    /// differ from it; `unknown` outside a git checkout.
    pub commit: String,
    /// The CPU's model name and its widest matrix units ([`cpu_description`]).
    pub cpu: String,
    pub threads: i32,
    /// When the run started, UTC, to the second: `2026-12-05T03:58:12Z`.
    pub started_utc: String,
}

impl RunStamp {
    /// The stamp of a run of `lesson` with `seed` starting now, on this machine, from this process's command line.
    pub fn now(lesson: &str, seed: u64) -> Self {
        let mut args = std::env::args();
        let program = args.next().map(|p| Path::new(&p).file_name().map_or(p.clone(), |n| n.to_string_lossy().into()));
        let command = program.into_iter().chain(args).collect::<Vec<_>>().join(" ");
        RunStamp {
            lesson: lesson.to_string(),
            command,
            seed,
            commit: git_commit(crate_root()),
            cpu: cpu_description(),
            threads: tch::get_num_threads(),
            started_utc: utc_timestamp(std::time::SystemTime::now()),
        }
    }
}

/// The commit of the checkout at `root` (12 hex digits), `+changes` when tracked files of src/, lessons/, data/ or
/// the build (Cargo.toml, Cargo.lock, build.rs) differ from it, or `unknown` when git or the checkout is missing.
pub fn git_commit(root: &Path) -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .arg("-C")
            .arg(root)
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    // what a run runs: the code, the build and the shipped data (the book and the tests can change meanwhile)
    let status = ["status", "--porcelain", "--untracked-files=no", "--", "src", "lessons", "Cargo.toml", "Cargo.lock"];
    match (git(&["rev-parse", "--short=12", "HEAD"]), git(&[&status[..], &["build.rs", "data"]].concat())) {
        (Some(head), Some(changes)) if !changes.is_empty() => format!("{head}+changes"),
        (Some(head), Some(_)) => head,
        _ => "unknown".into(),
    }
}

/// The CPU as benchmarks and run stamps name it: the model name of /proc/cpuinfo and its widest matrix units (AMX,
/// AVX-512 BF16, AVX-512, AVX2), e.g. `AMD EPYC (AVX-512 BF16)`; the architecture elsewhere.
pub fn cpu_description() -> String {
    let (model, units) = cpu_units();
    match units {
        Some(u) => format!("{model} ({u})"),
        None => model,
    }
}

/// Whether the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). Measured: on an AVX2-only EPYC libtorch emulates
/// bf16, 5–7× slower than f32 (chapter 09); on an EPYC with AVX-512 BF16 a whole 512² LCM image took 7.3 s in bf16
/// against 13.6 s in f32 (`bench_sd --parts lcm`, chapter 09).
pub fn cpu_has_bf16() -> bool {
    matches!(cpu_units().1, Some("AMX" | "AVX-512 BF16"))
}

/// The CPU's model name and its widest vector unit.
fn cpu_units() -> (String, Option<&'static str>) {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |name: &str| {
        info.lines().find(|l| l.starts_with(name)).and_then(|l| l.split_once(':')).map(|(_, v)| v.trim().to_string())
    };
    let flags = field("flags").unwrap_or_default();
    let has = |f: &str| flags.split_whitespace().any(|x| x == f);
    let units = [("amx_bf16", "AMX"), ("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")]
        .iter()
        .find(|(flag, _)| has(flag))
        .map(|(_, name)| *name);
    let model = field("model name").unwrap_or_else(|| std::env::consts::ARCH.to_string());
    (model, units)
}

/// `t` as an ISO 8601 UTC timestamp to the second (the civil-from-days algorithm of H. Hinnant's date library).
pub fn utc_timestamp(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097; // day of the 400-year era
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// results.md's text: `<!-- run {stamp as JSON} -->`, a `run` section saying where the numbers come from, then each
/// (anchor, markdown) section between `<!-- ANCHOR: name -->` and `<!-- ANCHOR_END: name -->` (mdBook drops those
/// lines when it includes a part).
pub fn results_markdown(stamp: &RunStamp, sections: &[(&str, String)]) -> Result<String> {
    let mut md = format!("<!-- run {} -->\n", serde_json::to_string(stamp)?);
    let date = stamp.started_utc.split('T').next().unwrap_or_default();
    let from = format!(
        "<small>From one run: <code>{}</code>, seed {}, commit {}, {}, {} threads, {date}.</small>",
        stamp.command, stamp.seed, stamp.commit, stamp.cpu, stamp.threads
    );
    let first = ("run", from);
    for (anchor, body) in std::iter::once(&first).chain(sections) {
        md.push_str(&format!("\n<!-- ANCHOR: {anchor} -->\n{}\n<!-- ANCHOR_END: {anchor} -->\n", body.trim_end()));
    }
    Ok(md)
}

/// A markdown table: `header`, then `rows` (each as long as the header).
pub fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let line = |cells: &[String]| format!("| {} |\n", cells.join(" | "));
    let mut md = line(&header.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    md.push_str(&format!("|{}\n", "---|".repeat(header.len())));
    for row in rows {
        md.push_str(&line(row));
    }
    md
}

/// Writes `dir/run.json`: `stamp` and the SHA-256 of every file directly in `dir` modified since `since` (the run's
/// start), run.json and hidden files aside — the files one run wrote, which the book copies together.
pub fn write_manifest(dir: &Path, stamp: &RunStamp, since: std::time::SystemTime) -> Result<()> {
    use sha2::Digest;
    let mut files = std::collections::BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let Some((entry, meta)) = entry.ok().and_then(|e| e.metadata().ok().map(|m| (e, m))) else { continue };
        let name = entry.file_name().to_string_lossy().into_owned();
        let fresh = meta.modified().map_or(true, |m| m >= since);
        if !meta.is_file() || name == "run.json" || name.starts_with('.') || !fresh {
            continue;
        }
        let bytes = std::fs::read(entry.path()).with_context(|| format!("cannot read {}", entry.path().display()))?;
        files.insert(name, format!("{:x}", sha2::Sha256::digest(&bytes)));
    }
    let manifest = serde_json::json!({ "run": stamp, "sha256": files });
    write_atomic(&dir.join("run.json"), serde_json::to_string_pretty(&manifest)?.as_bytes())
}

/// Checks that the files in `dir` come from one run, and returns its stamp: every file run.json lists that is in
/// `dir` has the SHA-256 it lists; metrics.json is there and carries the same stamp, and so does results.md's first
/// line when it is there. With `complete`, every other file directly in `dir` must be listed too (RUN.md and hidden
/// files aside): how tests/book.rs holds the book's figure folders to one run each.
pub fn verify_run_folder(dir: &Path, complete: bool) -> Result<RunStamp> {
    use sha2::Digest;
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).with_context(|| format!("{} has no {name}", dir.display()))
    };
    let manifest: serde_json::Value = serde_json::from_str(&read("run.json")?).context("run.json is not JSON")?;
    let stamp: RunStamp = serde_json::from_value(manifest["run"].clone()).context("run.json has no run stamp")?;
    let listed = manifest["sha256"].as_object().context("run.json has no sha256 table")?;
    for (name, sha) in listed {
        if let Ok(bytes) = std::fs::read(dir.join(name)) {
            let actual = format!("{:x}", sha2::Sha256::digest(&bytes));
            ensure!(Some(actual.as_str()) == sha.as_str(), "{}/{name} is not the file its run wrote", dir.display());
        }
    }
    let metrics: serde_json::Value =
        serde_json::from_str(&read("metrics.json")?).context("metrics.json is not JSON")?;
    ensure!(listed.contains_key("metrics.json"), "run.json does not list metrics.json");
    ensure!(metrics["run"] == manifest["run"], "metrics.json's run stamp differs from run.json's in {}", dir.display());
    if let Ok(results) = read("results.md") {
        let first = results.lines().next().unwrap_or_default();
        let json = first.strip_prefix("<!-- run ").and_then(|l| l.strip_suffix(" -->"));
        let of_results: Option<RunStamp> = json.and_then(|j| serde_json::from_str(j).ok());
        ensure!(
            of_results.as_ref() == Some(&stamp),
            "results.md's run stamp differs from run.json's in {}",
            dir.display()
        );
    }
    if complete {
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let skip = name == "run.json" || name == "RUN.md" || name.starts_with('.') || entry.path().is_dir();
            ensure!(
                skip || listed.contains_key(&name),
                "{}/{name} is not a file of the run in run.json",
                dir.display()
            );
        }
    }
    Ok(stamp)
}

/// A progress bar for a loop of `len` iterations, showing the message (for example the running loss) and the rate.
/// indicatif hides it when stderr is not a terminal, so lessons also print plain log lines.
pub fn progress(len: u64, prefix: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{prefix:>10} [{bar:30}] {pos}/{len} {per_sec:>10} eta {eta:>4} {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_prefix(prefix.to_string());
    bar
}

/// Prints a log line above the progress bar, or on stdout when the bar is hidden (stderr is not a terminal:
/// indicatif then drops `ProgressBar::println`, and logs piped to a file would lose every line).
pub fn log_line(bar: &ProgressBar, msg: impl AsRef<str>) {
    if bar.is_hidden() {
        println!("{}", msg.as_ref());
    } else {
        bar.println(msg.as_ref());
    }
}

/// Mean of the last `n` values of `losses` (of all of them when there are fewer; 0 when there are none): the
/// `final_loss_mean_last_100` of the lessons' metrics.
pub fn mean_of_last(losses: &[f64], n: usize) -> f64 {
    losses.iter().rev().take(n).sum::<f64>() / losses.len().clamp(1, n) as f64
}

/// `text` as it may appear in a message: control characters escaped (a prompt cannot move the terminal's cursor or
/// ring its bell), and at most `max` characters of it, the rest summarised.
pub fn for_message(text: &str, max: usize) -> String {
    let escaped: String = text
        .chars()
        .flat_map(|c| if c.is_control() { c.escape_default().collect::<Vec<_>>() } else { vec![c] })
        .collect();
    let n = escaped.chars().count();
    if n <= max {
        return escaped;
    }
    format!("{}… ({n} characters in all)", escaped.chars().take(max).collect::<String>())
}

/// An error naming `what` and `fix` when `x` holds a NaN or an infinity (a generated image, a loaded tensor), instead
/// of writing a black image and exiting 0.
pub fn ensure_finite(x: &tch::Tensor, what: &str, fix: &str) -> Result<()> {
    let finite = x.isfinite().all().int64_value(&[]) != 0;
    anyhow::ensure!(finite, "{what} holds NaN or infinite values: {fix}");
    Ok(())
}

/// Adds the keys of the object `extra` to the object `metrics` (a report struct serialised beside a lesson's own
/// keys); anything else is left as it was.
pub fn merge(metrics: &mut serde_json::Value, extra: serde_json::Value) {
    if let (Some(m), serde_json::Value::Object(e)) = (metrics.as_object_mut(), extra) {
        m.extend(e);
    }
}

/// A training run's progress: a bar over `total` steps showing the running loss, and `lines` log lines spread over
/// the run ("LABEL step k/total  loss x", through [`log_line`], so they reach a piped log too).
pub struct StepLog {
    bar: ProgressBar,
    label: String,
    total: u64,
    every: u64,
}

impl StepLog {
    pub fn new(total: u64, label: &str, lines: u64) -> Self {
        let every = total.checked_div(lines).map_or(u64::MAX, |e| e.max(1));
        Self { bar: progress(total, label), label: label.to_string(), total, every }
    }

    /// Step `step` (counted from 0) finished with `loss`.
    pub fn step(&self, step: usize, loss: f64) {
        self.bar.inc(1);
        self.bar.set_message(format!("loss {loss:.4}"));
        if (step as u64 + 1) % self.every == 0 {
            let total = self.total;
            log_line(&self.bar, format!("{} step {:>5}/{total}  loss {loss:.4}", self.label, step + 1));
        }
    }

    /// Removes the bar (the log lines stay).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// Runs a lesson's body and turns an error into one line on stderr and exit status 2 (no backtrace). Sets malloc up
/// first with [`keep_freed_memory`].
pub fn lesson_main(body: impl FnOnce() -> Result<()>) {
    keep_freed_memory();
    if let Err(e) = body() {
        eprintln!("error: {e:#}");
        std::process::exit(2);
    }
}

// ANCHOR: keep_freed_memory
/// Tell glibc's malloc to keep freed memory for the next allocation instead of handing it back to the kernel.
///
/// By default glibc serves every block above its mmap threshold (at most 32 MiB) with a fresh `mmap` and unmaps it
/// on `free`, and trims the top of the heap; the next tensor of that size then page-faults on new pages that the
/// kernel must zero first: about 4 GB of fresh pages per SD 1.5 UNet step. With no mmap'd blocks and no trimming,
/// freed blocks are reused from the heap. Measured on a process that builds SD 1.5's UNet and runs 4 guided steps
/// (chapter 09): page faults 3.9–4.8 M → 1.4 M (most of those left are the weights' first touch), CPU time 6–14 %
/// lower, peak memory 0.9–1.2 GB higher (the heap fragments). Other processes get the same settings through
/// [`KEEP_FREED_MEMORY_ENV`].
pub fn keep_freed_memory() {
    // SCRATCH_DIFFUSION_MALLOC=glibc keeps glibc's defaults (and its MALLOC_* environment variables), to measure
    if std::env::var("SCRATCH_DIFFUSION_MALLOC").is_ok_and(|v| v == "glibc") {
        return;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes malloc's parameters; called before the program allocates tensors.
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// [`keep_freed_memory`]'s settings as glibc's environment variables, for a child process that is not ours (a Python
/// one: `bench_sd --diffusers-same-malloc` runs diffusers with them).
pub const KEEP_FREED_MEMORY_ENV: [(&str, &str); 2] =
    [("MALLOC_MMAP_MAX_", "0"), ("MALLOC_TRIM_THRESHOLD_", "2147483647")];
// ANCHOR_END: keep_freed_memory

/// Hands the free pages malloc keeps (see [`keep_freed_memory`]) back to the kernel: after a phase whose buffers will
/// not be needed again (building the networks, freeing the text encoder), so that they stop counting as resident.
pub fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of malloc's own arenas.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Peak resident memory of this process so far (VmHWM of /proc/self/status) in MiB; NaN where there is no /proc.
pub fn peak_rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1));
    kib.and_then(|k| k.parse::<f64>().ok()).unwrap_or(f64::NAN) / 1024.0
}

/// The python of the venv that `./run.sh` creates (`$SCRATCH_DIFFUSION_VENV`, else `.venv` in the crate root), where
/// the parity tests and `bench_sd` find diffusers and transformers.
pub fn venv_python() -> PathBuf {
    let venv = std::env::var("SCRATCH_DIFFUSION_VENV").unwrap_or_else(|_| ".venv".into());
    Path::new(env!("CARGO_MANIFEST_DIR")).join(venv).join("bin/python")
}
/// Where MNIST lives in the repository (`data/mnist/fetch.sh` fills it).
pub const MNIST_DIR: &str = "data/mnist";
/// The first of MNIST's four files ([`crate::data::mnist::FILES`] names it from here): where it is, MNIST is.
pub const MNIST_TRAIN_IMAGES: &str = "train-images-idx3-ubyte.gz";

/// The crate's root folder, where `--ship` writes the files the repository ships.
pub fn crate_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A file or folder the repository ships (`relative` to the crate root, such as `data/lesson06`): under the working
/// directory when `marker` is there (a file inside the folder, or "" for the path itself), else under the crate root,
/// so a binary run from anywhere inside the clone finds it. The one resolver of shipped paths.
pub fn shipped_path(relative: &str, marker: &str) -> PathBuf {
    let local = PathBuf::from(relative);
    let present = if marker.is_empty() { local.exists() } else { local.join(marker).exists() };
    if present {
        return local;
    }
    crate_root().join(relative)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_writes_refuse_a_directory_and_leave_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let e = write_atomic(dir.path(), b"x").unwrap_err().to_string();
        assert!(e.contains("is a directory"), "{e}");
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let e = write_atomic(&dir.path().join("missing/b.json"), b"x").unwrap_err().to_string();
        assert!(e.contains("cannot write"), "{e}");
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, ["a.json"], "no temporary file is left");
    }

    #[test]
    fn text_in_messages_is_escaped_and_shortened() {
        assert_eq!(for_message("a bold 7", 80), "a bold 7");
        assert_eq!(for_message("a\x1b[2Jb\x07", 80), "a\\u{1b}[2Jb\\u{7}");
        let long = for_message(&"x".repeat(20_000), 10);
        assert_eq!(long, format!("{}… (20000 characters in all)", "x".repeat(10)));
    }

    #[test]
    fn write_loss_writes_a_csv_with_one_row_per_step_and_the_curve() {
        let dir = tempfile::tempdir().unwrap();
        let run = test_run(dir.path());
        run.write_loss("loss", ("l_simple", "L_simple"), &[0.5, 0.25]).unwrap();
        let csv = std::fs::read_to_string(run.path("loss.csv")).unwrap();
        assert_eq!(csv, "step,l_simple\n0,5.000000e-1\n1,2.500000e-1\n");
        assert_eq!(&std::fs::read(run.path("loss.png")).unwrap()[1..4], b"PNG");
    }

    fn test_run(dir: &Path) -> Run {
        Run {
            lesson: "test".into(),
            out: dir.to_path_buf(),
            device: Device::Cpu,
            seed: 3,
            quick: true,
            data_dir: dir.to_path_buf(),
            started: std::time::Instant::now(),
            started_at: std::time::SystemTime::now(),
            stamp: RunStamp::now("test", 3),
        }
    }

    /// metrics.json, results.md and run.json carry the same stamp, and run.json hashes exactly the files this run
    /// wrote: not one left from an earlier run, not itself.
    #[test]
    fn a_run_stamps_its_metrics_results_and_files() {
        use sha2::Digest;
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join("old.png");
        std::fs::write(&old, b"an earlier run").unwrap();
        let an_hour_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(3600);
        std::fs::File::options().write(true).open(&old).unwrap().set_modified(an_hour_ago).unwrap();
        let run = test_run(dir.path());
        assert_eq!((run.stamp().seed, run.stamp().lesson.as_str()), (3, "test"));
        assert!(run.stamp().command.starts_with("scratch_diffusion-"), "{}", run.stamp().command); // the test binary
        let table = markdown_table(&["σ", "error"], &[vec!["1.0".into(), "0.5".into()]]);
        assert_eq!(table, "| σ | error |\n|---|---|\n| 1.0 | 0.5 |\n");
        run.write_results(&[("errors", table)]).unwrap();
        run.write_metrics(serde_json::json!({ "loss": 0.5 })).unwrap();
        let read = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap();
        let metrics: serde_json::Value = serde_json::from_str(&read("metrics.json")).unwrap();
        let stamp = serde_json::to_value(run.stamp()).unwrap();
        assert_eq!(metrics["run"], stamp);
        let results = read("results.md");
        let first = results.lines().next().unwrap();
        let json = first.strip_prefix("<!-- run ").and_then(|l| l.strip_suffix(" -->")).unwrap();
        assert_eq!(serde_json::from_str::<serde_json::Value>(json).unwrap(), stamp);
        assert!(results.contains("<!-- ANCHOR: errors -->\n| σ | error |"), "{results}");
        assert!(results.contains("<!-- ANCHOR: run -->\n<small>From one run: <code>"), "{results}");
        let manifest: serde_json::Value = serde_json::from_str(&read("run.json")).unwrap();
        assert_eq!(manifest["run"], stamp);
        let hashes = manifest["sha256"].as_object().unwrap();
        assert_eq!(hashes.keys().collect::<Vec<_>>(), ["metrics.json", "results.md"]);
        let sha = format!("{:x}", sha2::Sha256::digest(read("metrics.json").as_bytes()));
        assert_eq!(hashes["metrics.json"], sha);
    }

    #[test]
    fn timestamps_are_utc_civil_dates() {
        let at = |s: u64| utc_timestamp(std::time::UNIX_EPOCH + std::time::Duration::from_secs(s));
        assert_eq!(at(0), "1970-01-01T00:00:00Z");
        assert_eq!(at(951_782_400), "2000-02-29T00:00:00Z"); // a leap day of a year divisible by 400
        assert_eq!(at(1_764_906_073), "2025-12-05T03:41:13Z");
        assert_eq!(at(4_107_542_399), "2100-02-28T23:59:59Z"); // 2100 is not a leap year
    }
}
