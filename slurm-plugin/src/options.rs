//! Parsing and validation of the plugin's two inputs: the site's plugstack.conf
//! arguments and the user's `--vm-wrap=OPTS`. Kept free of FFI so it can be
//! unit-tested without a Slurm process around it.

use std::fmt;
use std::path::PathBuf;

/// Shortest checkpoint interval accepted: a full checkpoint stops the
/// program, so anything shorter would spend most of the time checkpointing.
pub const MIN_INTERVAL_SECS: u32 = 10;
/// Checkpoint generations kept on disk; each can be as large as guest RAM.
pub const KEEP_RANGE: std::ops::RangeInclusive<u32> = 1..=10;
/// TERM is what Slurm sends on scancel, requeue and preemption; vmctl turns it
/// into "checkpoint and exit", so it cannot also be the keep-running signal.
const CHECKPOINT_SIGNALS: &[&str] = &["USR1", "USR2", "HUP", "ALRM", "URG", "WINCH"];
const DEFAULT_SIGNAL: &str = "USR2";
/// Time-limit continuations a job may have when the site sets no
/// `max_continuations`: enough for a day of work in two-hour pieces.
pub const DEFAULT_MAX_CONTINUATIONS: u32 = 12;
/// Smallest margin before the time limit: the requeue must reach slurmctld
/// before its time-limit check does.
pub const MIN_MARGIN_SECS: u32 = 5;

/// How slurmstepd spells an optional option argument that was not given
/// (`--vm-wrap` alone): Slurm formats the NULL optarg with "%s".
const NULL_OPTARG: &str = "(null)";

/// A memory size as vmctl's `--mem` takes it: a count with a binary unit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemSize {
    count: u64,
    unit: char,
}

impl MemSize {
    pub fn bytes(self) -> u64 {
        // parse() only builds sizes whose byte count fits.
        self.count << shift_of(self.unit)
    }

    /// Parses `8G`, `512m`, `1T`. A bare number is refused rather than
    /// guessed at: Slurm's own `--mem` reads it as MiB, a byte count is the
    /// other common reading, and either guess would surprise someone.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let Some(last) = text.chars().last() else {
            return Err("empty size".into());
        };
        if last.is_ascii_digit() {
            return Err(format!(
                "'{text}' has no unit; write e.g. {text}G or {text}M (units K, M, G, T)"
            ));
        }
        let unit = last.to_ascii_uppercase();
        if !matches!(unit, 'K' | 'M' | 'G' | 'T') {
            return Err(format!(
                "'{text}' has unit '{last}'; the units are K, M, G and T"
            ));
        }
        let digits = &text[..text.len() - last.len_utf8()];
        let count: u64 = parse_decimal(digits)
            .ok_or_else(|| format!("'{text}' is not a whole number followed by K, M, G or T"))?;
        if count == 0 {
            return Err("size must be greater than zero".into());
        }
        // Reject values whose byte count would overflow before anyone
        // compares them against max_mem.
        if count.checked_mul(1u64 << shift_of(unit)).is_none() {
            return Err(format!("'{text}' is too large"));
        }
        Ok(MemSize { count, unit })
    }
}

fn shift_of(unit: char) -> u32 {
    match unit {
        'K' => 10,
        'M' => 20,
        'G' => 30,
        _ => 40,
    }
}

impl fmt::Display for MemSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{}", self.count, self.unit)
    }
}

/// Parses ASCII digits only: `str::parse` also accepts a leading '+', which
/// would make "+10" valid in one place and not another.
fn parse_decimal<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_interval(value: &str) -> Result<u32, String> {
    let secs: u32 =
        parse_decimal(value).ok_or_else(|| format!("'{value}' is not a number of seconds"))?;
    if secs < MIN_INTERVAL_SECS {
        return Err(format!(
            "{secs} seconds is too short; the minimum is {MIN_INTERVAL_SECS}"
        ));
    }
    Ok(secs)
}

fn parse_keep(value: &str) -> Result<u32, String> {
    let keep: u32 =
        parse_decimal(value).ok_or_else(|| format!("'{value}' is not a whole number"))?;
    if !KEEP_RANGE.contains(&keep) {
        return Err(format!(
            "{keep} is out of range; keep must be {} to {}",
            KEEP_RANGE.start(),
            KEEP_RANGE.end()
        ));
    }
    Ok(keep)
}

/// Checks a compression for vmctl's `--compress`: off, lz4, zstd or zstd:LEVEL
/// (1 to 19), and returns it as vmctl takes it.
fn parse_compress(value: &str) -> Result<String, String> {
    let ok = match value {
        "off" | "lz4" | "zstd" => true,
        _ => value
            .strip_prefix("zstd:")
            .and_then(parse_decimal::<u32>)
            .is_some_and(|level| (1..=19).contains(&level)),
    };
    if ok {
        Ok(value.to_string())
    } else {
        Err(format!(
            "'{value}' is not off, lz4, zstd or zstd:LEVEL (LEVEL 1 to 19)"
        ))
    }
}

/// Returns the canonical name (no SIG prefix, upper case) vmctl's
/// `--on-signal` takes.
fn parse_signal(value: &str) -> Result<String, String> {
    let upper = value.trim().to_ascii_uppercase();
    let name = upper.strip_prefix("SIG").unwrap_or(&upper);
    if CHECKPOINT_SIGNALS.contains(&name) {
        return Ok(name.to_string());
    }
    if name == "TERM" {
        return Err(
            "TERM is reserved: Slurm sends it before killing a job, and vmwrap then \
             checkpoints and stops the program"
                .into(),
        );
    }
    Err(format!(
        "'{value}' is not one of {}",
        CHECKPOINT_SIGNALS.join(", ")
    ))
}

/// Checks a file policy for `vmctl --files` (see `vmctl run --help`): `journal`,
/// `journal:SIZE`, `truncate`, `refuse` or `none`.
fn parse_files(value: &str) -> Result<String, String> {
    let (name, size) = match value.split_once(':') {
        Some((n, s)) => (n, Some(s)),
        None => (value, None),
    };
    match (name, size) {
        ("journal" | "truncate" | "refuse" | "none", None) => Ok(value.to_string()),
        ("journal", Some(size)) => MemSize::parse(size).map(|s| format!("journal:{s}")),
        _ => Err(format!(
            "'{value}' is not a file policy: use journal, journal:SIZE, truncate, refuse or none"
        )),
    }
}

/// Site configuration from the plugin's plugstack.conf line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub vmctl: PathBuf,
    pub checkpoint_root: PathBuf,
    pub default_interval: Option<u32>,
    pub default_keep: Option<u32>,
    /// What restores do with the job's files (vmctl --files); vmctl's default if None.
    pub default_files: Option<String>,
    /// `--compress` for every wrapped step unless it says otherwise.
    pub default_compress: Option<String>,
    pub max_mem: Option<MemSize>,
    pub allow_user_override: bool,
    /// Pin a requeued wrapped job to the CPU class its checkpoint was taken on.
    pub steer_cpu_class: bool,
    /// Most time-limit continuations (requeues of the job, counted by
    /// Slurm's Restarts) a job may have; 0 turns `timelimit=continue` off.
    pub max_continuations: u32,
    /// Hand restores a /dev/userfaultfd descriptor, so that vmctl resumes a job before
    /// its memory is loaded (vmctl restore --lazy).
    pub lazy_restore: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            vmctl: PathBuf::from("/usr/local/bin/vmctl"),
            checkpoint_root: PathBuf::from("/var/lib/vmwrap/checkpoints"),
            default_interval: None,
            default_keep: None,
            default_files: None,
            default_compress: None,
            max_mem: None,
            allow_user_override: true,
            steer_cpu_class: true,
            max_continuations: DEFAULT_MAX_CONTINUATIONS,
            lazy_restore: false,
        }
    }
}

impl Config {
    /// Parses `key=value` words. Every problem is reported, not just the
    /// first, so an admin fixes plugstack.conf in one go.
    pub fn parse<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Config, Vec<String>> {
        let mut config = Config::default();
        let mut errors = Vec::new();
        for arg in args {
            let Some((key, value)) = arg.split_once('=') else {
                errors.push(format!("plugstack.conf argument '{arg}' is not key=value"));
                continue;
            };
            let result = match key {
                "vmctl" => absolute_path(value).map(|p| config.vmctl = p),
                "checkpoint_root" => absolute_path(value).map(|p| config.checkpoint_root = p),
                "default_interval" => {
                    parse_interval(value).map(|v| config.default_interval = Some(v))
                }
                "default_keep" => parse_keep(value).map(|v| config.default_keep = Some(v)),
                "default_files" => parse_files(value).map(|v| config.default_files = Some(v)),
                "default_compress" => {
                    parse_compress(value).map(|v| config.default_compress = Some(v))
                }
                "max_mem" => MemSize::parse(value).map(|v| config.max_mem = Some(v)),
                "max_continuations" => parse_decimal(value)
                    .map(|v| config.max_continuations = v)
                    .ok_or_else(|| format!("'{value}' is not a whole number")),
                "allow_user_override" => match value {
                    "yes" => {
                        config.allow_user_override = true;
                        Ok(())
                    }
                    "no" => {
                        config.allow_user_override = false;
                        Ok(())
                    }
                    _ => Err(format!("'{value}' is not yes or no")),
                },
                "steer_cpu_class" => match value {
                    "yes" => {
                        config.steer_cpu_class = true;
                        Ok(())
                    }
                    "no" => {
                        config.steer_cpu_class = false;
                        Ok(())
                    }
                    _ => Err(format!("'{value}' is not yes or no")),
                },
                "lazy_restore" => match value {
                    "yes" => {
                        config.lazy_restore = true;
                        Ok(())
                    }
                    "no" => {
                        config.lazy_restore = false;
                        Ok(())
                    }
                    _ => Err(format!("'{value}' is not yes or no")),
                },
                _ => {
                    errors.push(format!(
                        "unknown plugstack.conf argument '{arg}' (known: vmctl, checkpoint_root, \
                         default_interval, default_keep, default_files, default_compress, \
                         max_mem, allow_user_override, steer_cpu_class, max_continuations, \
                         lazy_restore)"
                    ));
                    continue;
                }
            };
            if let Err(why) = result {
                errors.push(format!("plugstack.conf argument {key}: {why}"));
            }
        }
        if errors.is_empty() {
            Ok(config)
        } else {
            Err(errors)
        }
    }
}

fn absolute_path(value: &str) -> Result<PathBuf, String> {
    let path = PathBuf::from(value);
    if path.is_absolute() {
        Ok(path)
    } else {
        Err(format!("'{value}' is not an absolute path"))
    }
}

/// The keys `--vm-wrap=` accepts, for error messages.
const KEYS: &str =
    "interval, keep, compress, mem, signal, script, timelimit, margin, continuations, files";

/// What one wrapped step asked for, after site defaults and limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WrapOptions {
    pub interval: Option<u32>,
    pub keep: Option<u32>,
    /// vmctl's `--compress`; None: vmctl's default.
    pub compress: Option<String>,
    pub mem: Option<MemSize>,
    pub signal: String,
    /// `timelimit=continue`: the batch job checkpoints and requeues itself
    /// a little before its time limit (see batch.rs).
    pub continue_at_limit: bool,
    /// Seconds before the time limit to do so; None: a third of KillWait.
    pub margin: Option<u32>,
    /// The user's own cap on continuations (at most the site's).
    pub continuations: u32,
    /// `script=native`: the batch script runs natively (only its srun
    /// steps are wrapped) instead of in a VM of its own.
    pub native_script: bool,
    pub files: Option<String>,
}

impl fmt::Display for WrapOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn or_default<T: fmt::Display>(v: &Option<T>) -> String {
            v.as_ref()
                .map_or_else(|| "vmctl default".into(), T::to_string)
        }
        write!(
            f,
            "interval={} keep={} mem={} signal={}",
            or_default(&self.interval),
            or_default(&self.keep),
            or_default(&self.mem),
            self.signal
        )?;
        if let Some(compress) = &self.compress {
            write!(f, " compress={compress}")?;
        }
        if self.continue_at_limit {
            write!(
                f,
                " timelimit=continue margin={} continuations={}",
                self.margin
                    .map_or_else(|| "KillWait/3".into(), |m| m.to_string()),
                self.continuations
            )?;
        }
        match &self.files {
            Some(files) => write!(f, " files={files}"),
            None => Ok(()),
        }
    }
}

impl WrapOptions {
    /// Parses the `--vm-wrap` argument: absent, empty or Slurm's "(null)"
    /// mean "wrap with the site defaults".
    pub fn parse(optarg: Option<&str>, config: &Config) -> Result<WrapOptions, String> {
        let mut opts = WrapOptions {
            interval: config.default_interval,
            keep: config.default_keep,
            compress: config.default_compress.clone(),
            // The site's maximum is also the default: without it vmctl would
            // give the VM half the host.
            mem: config.max_mem,
            signal: DEFAULT_SIGNAL.to_string(),
            continue_at_limit: false,
            margin: None,
            continuations: config.max_continuations,
            native_script: false,
            files: config.default_files.clone(),
        };
        let text = match optarg.map(str::trim) {
            None | Some("") | Some(NULL_OPTARG) => return Ok(opts),
            Some(text) => text,
        };
        for item in text.split(',') {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some((key, value)) = item.split_once('=') else {
                return Err(format!("'{item}' is not key=value (keys: {KEYS})"));
            };
            let (key, value) = (key.trim(), value.trim());
            let policy_key = matches!(key, "interval" | "keep" | "files" | "compress");
            if policy_key && !config.allow_user_override {
                return Err(format!(
                    "{key}= is set by the site for all jobs and cannot be changed here"
                ));
            }
            match key {
                "interval" => {
                    opts.interval =
                        Some(parse_interval(value).map_err(|e| format!("interval: {e}"))?)
                }
                "keep" => opts.keep = Some(parse_keep(value).map_err(|e| format!("keep: {e}"))?),
                "compress" => {
                    opts.compress =
                        Some(parse_compress(value).map_err(|e| format!("compress: {e}"))?)
                }
                "mem" => {
                    let mem = MemSize::parse(value).map_err(|e| format!("mem: {e}"))?;
                    if let Some(max) = config.max_mem {
                        if mem.bytes() > max.bytes() {
                            return Err(format!(
                                "mem: {mem} is more than this site's limit of {max}"
                            ));
                        }
                    }
                    opts.mem = Some(mem);
                }
                "signal" => {
                    opts.signal = parse_signal(value).map_err(|e| format!("signal: {e}"))?
                }
                "script" => {
                    opts.native_script = match value {
                        "wrap" => false,
                        "native" => true,
                        _ => return Err(format!("script: '{value}' is not wrap or native")),
                    }
                }
                "files" => {
                    opts.files = Some(parse_files(value).map_err(|e| format!("files: {e}"))?)
                }
                "timelimit" => {
                    opts.continue_at_limit = match value {
                        "continue" => true,
                        "stop" => false,
                        _ => return Err(format!("timelimit: '{value}' is not continue or stop")),
                    }
                }
                "margin" => {
                    let secs: u32 = parse_decimal(value)
                        .ok_or_else(|| format!("margin: '{value}' is not a number of seconds"))?;
                    if secs < MIN_MARGIN_SECS {
                        return Err(format!(
                            "margin: {secs} seconds is too short; the minimum is {MIN_MARGIN_SECS}"
                        ));
                    }
                    opts.margin = Some(secs);
                }
                "continuations" => {
                    let n: u32 = parse_decimal(value)
                        .ok_or_else(|| format!("continuations: '{value}' is not a whole number"))?;
                    if n > config.max_continuations {
                        return Err(format!(
                            "continuations: {n} is more than this site's limit of {}",
                            config.max_continuations
                        ));
                    }
                    opts.continuations = n;
                }
                _ => return Err(format!("unknown key '{key}' (keys: {KEYS})")),
            }
        }
        if opts.continue_at_limit && opts.native_script {
            return Err(
                "timelimit=continue needs the batch script wrapped; drop script=native".into(),
            );
        }
        if opts.continue_at_limit && config.max_continuations == 0 {
            return Err(
                "timelimit=continue is turned off on this site (max_continuations=0)".into(),
            );
        }
        Ok(opts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(MemSize::parse("8G").unwrap().bytes(), 8 << 30);
        assert_eq!(MemSize::parse("512m").unwrap().to_string(), "512M");
        assert_eq!(MemSize::parse("1T").unwrap().bytes(), 1 << 40);
        assert!(MemSize::parse("8").unwrap_err().contains("no unit"));
        assert!(MemSize::parse("8X").is_err());
        assert!(MemSize::parse("G").is_err());
        assert!(MemSize::parse("+8G").is_err());
        assert!(MemSize::parse("0G").is_err());
        assert!(MemSize::parse("99999999999T").is_err());
    }

    #[test]
    fn null_and_empty_mean_defaults() {
        let config = Config {
            default_interval: Some(600),
            default_keep: Some(3),
            ..Config::default()
        };
        for arg in [None, Some(""), Some("(null)")] {
            let opts = WrapOptions::parse(arg, &config).unwrap();
            assert_eq!(opts.interval, Some(600));
            assert_eq!(opts.keep, Some(3));
            assert_eq!(opts.mem, None);
            assert_eq!(opts.signal, "USR2");
        }
    }

    #[test]
    fn full_opts() {
        let opts = WrapOptions::parse(
            Some("interval=600,keep=2,mem=8G,signal=SIGUSR1"),
            &Config::default(),
        )
        .unwrap();
        assert_eq!(opts.interval, Some(600));
        assert_eq!(opts.keep, Some(2));
        assert_eq!(opts.mem.unwrap().to_string(), "8G");
        assert_eq!(opts.signal, "USR1");
        assert_eq!(opts.to_string(), "interval=600 keep=2 mem=8G signal=USR1");
        let opts = WrapOptions::parse(Some("files=journal:256M"), &Config::default()).unwrap();
        assert_eq!(opts.files.as_deref(), Some("journal:256M"));
        let c = Config::parse(["default_files=truncate"]).unwrap();
        assert_eq!(c.default_files.as_deref(), Some("truncate"));
        let opts = WrapOptions::parse(None, &c).unwrap();
        assert_eq!(opts.to_string(), "interval=vmctl default keep=vmctl default mem=vmctl default signal=USR2 files=truncate");
    }

    #[test]
    fn bad_opts_are_explained() {
        let c = Config::default();
        let err = |s| WrapOptions::parse(Some(s), &c).unwrap_err();
        assert!(err("keep=abc").starts_with("keep:"));
        assert!(err("keep=0").contains("1 to 10"));
        assert!(err("keep=11").contains("1 to 10"));
        assert!(err("interval=5").contains("minimum is 10"));
        assert!(err("interval=-1").starts_with("interval:"));
        assert!(err("signal=TERM").contains("reserved"));
        assert!(err("signal=KILL").starts_with("signal:"));
        assert!(err("colour=red").contains("unknown key 'colour'"));
        assert!(err("keep").contains("not key=value"));
        assert!(err("timelimit=forever").contains("continue or stop"));
        assert!(err("margin=2").contains("minimum is 5"));
        assert!(err("continuations=99").contains("limit of 12"));
        assert!(err("script=vm").contains("wrap or native"));
        assert!(err("script=native,timelimit=continue").contains("drop script=native"));
        assert!(
            WrapOptions::parse(Some("script=native"), &c)
                .unwrap()
                .native_script
        );
        assert!(err("files=keep").starts_with("files:"));
        assert!(err("files=truncate:1G").starts_with("files:"));
    }

    #[test]
    fn time_limit_continuation() {
        let c = Config::default();
        let opts =
            WrapOptions::parse(Some("timelimit=continue,margin=20,continuations=3"), &c).unwrap();
        assert!(opts.continue_at_limit);
        assert_eq!((opts.margin, opts.continuations), (Some(20), 3));
        assert!(opts
            .to_string()
            .ends_with("timelimit=continue margin=20 continuations=3"));
        let plain = WrapOptions::parse(None, &c).unwrap();
        assert!(!plain.continue_at_limit);
        assert_eq!(plain.continuations, DEFAULT_MAX_CONTINUATIONS);
        let off = Config {
            max_continuations: 0,
            ..Config::default()
        };
        assert!(WrapOptions::parse(Some("timelimit=continue"), &off)
            .unwrap_err()
            .contains("turned off"));
        assert_eq!(
            Config::parse(["max_continuations=3"])
                .unwrap()
                .max_continuations,
            3
        );
    }

    #[test]
    fn site_limits() {
        let c = Config {
            max_mem: Some(MemSize::parse("4G").unwrap()),
            allow_user_override: false,
            ..Config::default()
        };
        assert!(WrapOptions::parse(Some("mem=4G"), &c).is_ok());
        assert!(WrapOptions::parse(Some("mem=4097M"), &c)
            .unwrap_err()
            .contains("limit of 4G"));
        assert!(WrapOptions::parse(Some("interval=60"), &c)
            .unwrap_err()
            .contains("set by the site"));
        assert!(WrapOptions::parse(Some("signal=USR1"), &c).is_ok());
        // No mem= under a site maximum means the maximum, not vmctl's default.
        assert_eq!(WrapOptions::parse(None, &c).unwrap().mem, c.max_mem);
        assert_eq!(
            WrapOptions::parse(Some("mem=1G"), &c).unwrap().mem,
            Some(MemSize::parse("1G").unwrap())
        );
    }

    #[test]
    fn compression() {
        let c = Config::parse(["default_compress=lz4"]).unwrap();
        assert_eq!(c.default_compress.as_deref(), Some("lz4"));
        assert_eq!(
            WrapOptions::parse(None, &c).unwrap().compress.as_deref(),
            Some("lz4")
        );
        let opts = WrapOptions::parse(Some("compress=zstd:3"), &c).unwrap();
        assert_eq!(opts.compress.as_deref(), Some("zstd:3"));
        assert!(opts.to_string().ends_with(" compress=zstd:3"), "{opts}");
        assert_eq!(
            WrapOptions::parse(Some("compress=off"), &c)
                .unwrap()
                .compress
                .as_deref(),
            Some("off")
        );
        for bad in ["gzip", "zstd:0", "zstd:20", "zstd:", "zstd:-1", ""] {
            let e = WrapOptions::parse(Some(&format!("compress={bad}")), &c).unwrap_err();
            assert!(
                e.starts_with("compress: ") && e.contains("zstd:LEVEL"),
                "{e}"
            );
        }
        assert!(
            Config::parse(["default_compress=zip"]).unwrap_err()[0].contains("default_compress")
        );
        let fixed = Config {
            allow_user_override: false,
            ..c
        };
        assert!(WrapOptions::parse(Some("compress=off"), &fixed)
            .unwrap_err()
            .contains("set by the site"));
        assert_eq!(
            WrapOptions::parse(None, &Config::default())
                .unwrap()
                .compress,
            None
        );
    }

    #[test]
    fn config_args() {
        let c = Config::parse([
            "vmctl=/opt/vmwrap/vmctl",
            "checkpoint_root=/scratch/ckpt",
            "default_interval=300",
            "default_keep=2",
            "max_mem=16G",
            "allow_user_override=no",
            "lazy_restore=yes",
        ])
        .unwrap();
        assert!(c.lazy_restore && !Config::default().lazy_restore);
        assert!(Config::parse(["lazy_restore=maybe"]).is_err());
        assert_eq!(c.vmctl, PathBuf::from("/opt/vmwrap/vmctl"));
        assert_eq!(c.checkpoint_root, PathBuf::from("/scratch/ckpt"));
        assert_eq!(c.default_interval, Some(300));
        assert_eq!(c.default_keep, Some(2));
        assert_eq!(c.max_mem.unwrap().bytes(), 16 << 30);
        assert!(!c.allow_user_override);

        let errors = Config::parse(["bogus=1", "vmctl=relative", "default_keep=99", "noequals"])
            .unwrap_err();
        assert_eq!(errors.len(), 4, "{errors:?}");
        assert!(errors[0].contains("'bogus=1'"));
    }

    /// Every plugstack argument and --vm-wrap key this file accepts is described
    /// in the man page, which is written by hand: this keeps it honest.
    #[test]
    fn man_page_names_every_option() {
        let source = include_str!("options.rs");
        let man = include_str!("../doc/vmwrap-plugin.8").replace("\\-", "-");
        let mut keys = Vec::new();
        for line in source.lines() {
            let line = line.trim();
            // Match arms on option names: `"name" => ...`.
            if let Some(rest) = line.strip_prefix('"') {
                if let Some((key, tail)) = rest.split_once('"') {
                    if tail.trim_start().starts_with("=>")
                        && key.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                        && ![
                            "yes",
                            "no",
                            "checkpoint",
                            "wrap",
                            "native",
                            "continue",
                            "stop",
                        ]
                        .contains(&key)
                    {
                        keys.push(key.to_string());
                    }
                }
            }
        }
        for key in [
            "vmctl",
            "checkpoint_root",
            "steer_cpu_class",
            "interval",
            "mem",
            "signal",
        ] {
            assert!(
                keys.iter().any(|k| k == key),
                "the scan missed {key}: {keys:?}"
            );
        }
        for key in &keys {
            assert!(
                man.contains(&format!("{key}=")),
                "doc/vmwrap-plugin.8 does not describe {key}="
            );
        }
        for signal in CHECKPOINT_SIGNALS {
            assert!(
                man.contains(signal),
                "doc/vmwrap-plugin.8 does not list signal {signal}"
            );
        }
    }
}
