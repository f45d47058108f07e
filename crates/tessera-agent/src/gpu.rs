//! GPU discovery and GPU telemetry for the node agent.
//!
//! This module owns everything the agent knows about NVIDIA GPUs:
//!
//! * [`discover`] builds the node's GPU inventory ([`GpuInfo`]). It asks NVML first (through
//!   `nvml-wrapper`, which loads `libnvidia-ml` at run time, so a node without the driver simply
//!   has no NVML), then falls back to running `nvidia-smi -q -x` with a timeout, and otherwise
//!   reports no GPUs. It never fails: every problem is logged and the next source is tried.
//! * [`parse_nvidia_smi_xml`] and [`parse_nvidia_smi_telemetry`] turn the XML that
//!   `nvidia-smi -q -x` prints into inventory entries and into per-GPU telemetry readings
//!   ([`GpuTelemetry`], for heartbeats).
//!
//! A GPU is reported unhealthy (and is then not scheduled) when it has volatile uncorrectable ECC
//! errors, or when the driver reports a pending or failed memory repair (page retirement, row
//! remapping, channel/TPC repair), unrepairable memory, an exceeded SRAM error threshold or a
//! recovery action it needs (reset, reboot, drain). Values the GPU does not report ("N/A",
//! "Not Supported") count as unknown, which is healthy.

use std::ffi::OsStr;
use std::io::{self, Read};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use nvml_wrapper::enum_wrappers::device::{EccCounter, MemoryError};
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{Device, Nvml};
use roxmltree::{Document, Node, ParsingOptions};
use tessera_core::node::GpuInfo;
use tracing::{debug, warn};

/// Source name [`discover`] returns when NVML produced the inventory.
pub const SOURCE_NVML: &str = "nvml";
/// Source name [`discover`] returns when `nvidia-smi -q -x` produced the inventory.
pub const SOURCE_NVIDIA_SMI: &str = "nvidia-smi";
/// Source name [`discover`] returns when no source found any GPU.
pub const SOURCE_NONE: &str = "none";

/// How long `nvidia-smi -q -x` may run before it is killed.
pub const NVIDIA_SMI_TIMEOUT: Duration = Duration::from_secs(10);

/// The NVML library under its unversioned name (what `Nvml::init` loads) exists only where the
/// driver's development files are installed; driver-only hosts and containers have this one.
const NVML_VERSIONED_LIB: &str = "libnvidia-ml.so.1";

/// Upper bound on what is read from a command's stdout or stderr (a node with many GPUs prints
/// a few hundred KiB).
const MAX_COMMAND_OUTPUT: u64 = 64 * 1024 * 1024;

/// One telemetry reading of one GPU, parsed from `nvidia-smi -q -x`.
///
/// Every measurement is `None` when the GPU does not report it ("N/A", "Not Supported") or
/// reports something that cannot be read.
#[derive(Debug, Clone, PartialEq)]
pub struct GpuTelemetry {
    /// Same index as [`GpuInfo::index`] (the minor number).
    pub index: u32,
    pub uuid: String,
    /// `<utilization><gpu_util>`, percent of time a kernel was running.
    pub utilization_percent: Option<u32>,
    /// `<fb_memory_usage><used>`, in bytes.
    pub memory_used_bytes: Option<u64>,
    /// `<temperature><gpu_temp>`, degrees Celsius.
    pub temperature_celsius: Option<u32>,
    /// Board power draw in watts: the instantaneous reading where the driver prints one, else
    /// the average.
    pub power_watts: Option<f64>,
    /// Volatile (since driver load) uncorrectable ECC errors, summed over memory kinds.
    pub ecc_uncorrected_volatile: Option<u64>,
    /// Same health rule as [`GpuInfo::healthy`].
    pub healthy: bool,
}

/// Why the XML of `nvidia-smi -q -x` could not be read.
#[derive(Debug, thiserror::Error)]
pub enum GpuParseError {
    #[error("nvidia-smi XML is malformed: {0}")]
    Xml(#[from] roxmltree::Error),
    #[error("not nvidia-smi XML: the root element is <{0}>, expected <nvidia_smi_log>")]
    UnexpectedRoot(String),
    #[error("GPU #{gpu} in nvidia-smi XML has no <{field}> value")]
    MissingField {
        /// Position of the `<gpu>` element in the document, from 0.
        gpu: usize,
        /// Element path below `<gpu>`, e.g. `fb_memory_usage/total`.
        field: &'static str,
    },
    #[error("GPU #{gpu} in nvidia-smi XML has an unreadable <{field}> value {value:?}")]
    InvalidValue {
        /// Position of the `<gpu>` element in the document, from 0.
        gpu: usize,
        /// Element path below `<gpu>`.
        field: &'static str,
        value: String,
    },
}

/// Discovers the node's GPUs: NVML first, else `nvidia-smi -q -x` (killed after
/// [`NVIDIA_SMI_TIMEOUT`]; skipped when the binary is absent), else none.
///
/// Returns the GPUs sorted by index and the name of the source that found them:
/// [`SOURCE_NVML`], [`SOURCE_NVIDIA_SMI`] or, with an empty list, [`SOURCE_NONE`]. A source that
/// works but sees no GPU does not end the search. Never fails and never panics; problems are
/// logged.
///
/// This blocks (for up to [`NVIDIA_SMI_TIMEOUT`] plus NVML's own start-up); from async code, call
/// it through `tokio::task::spawn_blocking`.
pub fn discover() -> (Vec<GpuInfo>, &'static str) {
    match discover_nvml() {
        Ok(gpus) if !gpus.is_empty() => return (finish(gpus, SOURCE_NVML), SOURCE_NVML),
        Ok(_) => debug!("NVML works but reports no GPUs"),
        Err(NvmlError::LibloadingError(e)) => debug!(error = %e, "NVML library not found"),
        // The library without a running driver: a node with NVIDIA software but no GPU, or a
        // broken driver, which nvidia-smi below will report.
        Err(NvmlError::DriverNotLoaded) => debug!("NVML found but the NVIDIA driver is not loaded"),
        Err(e) => warn!(error = %e, "NVML is present but GPU discovery through it failed"),
    }

    match run_with_timeout("nvidia-smi", &["-q", "-x"], NVIDIA_SMI_TIMEOUT) {
        Ok(xml) => match parse_gpus(&xml) {
            Ok(gpus) if !gpus.is_empty() => {
                return (finish(gpus, SOURCE_NVIDIA_SMI), SOURCE_NVIDIA_SMI);
            }
            Ok(_) => debug!("nvidia-smi reports no GPUs"),
            Err(e) => warn!(error = %e, "could not parse the output of `nvidia-smi -q -x`"),
        },
        Err(CommandError::NotFound(_)) => debug!("nvidia-smi is not installed"),
        Err(e) => warn!(error = %e, "GPU discovery through nvidia-smi failed"),
    }

    (Vec::new(), SOURCE_NONE)
}

/// Reads live telemetry of every GPU from `source` (as [`discover`] named it): NVML, or
/// `nvidia-smi -q -x`, or the file `xml` when the inventory came from one. Empty when there
/// are no GPUs or the source fails (logged). Blocks; call it through `spawn_blocking`.
pub fn sample_telemetry(source: &str, xml: Option<&std::path::Path>) -> Vec<GpuTelemetry> {
    let from_xml = |text: String| {
        parse_nvidia_smi_telemetry(&text).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read GPU telemetry");
            Vec::new()
        })
    };
    if let Some(path) = xml {
        return std::fs::read_to_string(path)
            .map(from_xml)
            .unwrap_or_default();
    }
    match source {
        SOURCE_NVML => match nvml_telemetry() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "NVML telemetry failed");
                Vec::new()
            }
        },
        SOURCE_NVIDIA_SMI => {
            match run_with_timeout("nvidia-smi", &["-q", "-x"], NVIDIA_SMI_TIMEOUT) {
                Ok(text) => from_xml(text),
                Err(e) => {
                    warn!(error = %e, "nvidia-smi telemetry failed");
                    Vec::new()
                }
            }
        }
        _ => Vec::new(),
    }
}

/// Whether an Xid (the driver's error code for a GPU fault) means the GPU
/// must not get new work until it is reset: uncorrectable or uncontained
/// memory errors (48, 63, 64, 95, 140), internal micro-controller and GSP
/// failures (61, 62, 119, 120), NVLink errors (74), and a GPU that has
/// fallen off the bus (79). Application faults (13, 31, 43, 45) and
/// contained errors (94) leave the GPU usable.
pub fn xid_is_fatal(xid: u64) -> bool {
    matches!(xid, 48 | 61 | 62 | 63 | 64 | 74 | 79 | 95 | 119 | 120 | 140)
}

/// GPUs (by index) that reported a fatal Xid since the agent started, with
/// the Xid. Sticky: a GPU needs a reset (and the agent a restart) to be
/// trusted again.
pub type XidRecord = std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<u32, u64>>>;

/// Watches NVML's critical-Xid events, one thread per GPU, recording fatal
/// ones in `sick`. Does nothing where NVML is not usable (no NVIDIA
/// driver): returns whether it started.
pub fn watch_xids(sick: XidRecord) -> bool {
    let Ok(nvml) = init_nvml() else {
        return false;
    };
    let count = nvml.device_count().unwrap_or(0);
    if count == 0 {
        return false;
    }
    let spawned = thread::Builder::new()
        .name("xid-watch".into())
        .spawn(move || {
            thread::scope(|scope| {
                for position in 0..count {
                    let (nvml, sick) = (&nvml, sick.clone());
                    scope.spawn(move || {
                        let Ok(device) = nvml.device_by_index(position) else {
                            return;
                        };
                        let index = device.minor_number().unwrap_or(position);
                        let set = nvml.create_event_set().map_err(Into::into).and_then(|set| {
                            device.register_events(
                                nvml_wrapper::bitmasks::event::EventTypes::CRITICAL_XID_ERROR,
                                set,
                            )
                        });
                        let set = match set {
                            Ok(set) => set,
                            Err(e) => {
                                warn!(gpu = index, error = %e.error, "cannot watch Xid errors");
                                return;
                            }
                        };
                        loop {
                            match set.wait(10_000) {
                                Ok(event) => {
                                    if let Some(nvml_wrapper::enums::event::XidError::Value(xid)) =
                                        event.event_data
                                    {
                                        if xid_is_fatal(xid) {
                                            warn!(
                                                gpu = index,
                                                xid, "fatal Xid: the GPU leaves scheduling"
                                            );
                                            sick.lock()
                                                .unwrap_or_else(|e| e.into_inner())
                                                .insert(index, xid);
                                        } else {
                                            debug!(gpu = index, xid, "Xid reported");
                                        }
                                    }
                                }
                                Err(NvmlError::Timeout) => {}
                                Err(e) => {
                                    warn!(gpu = index, error = %e, "stopped watching Xid errors");
                                    return;
                                }
                            }
                        }
                    });
                }
            });
        });
    spawned.is_ok()
}

fn nvml_telemetry() -> Result<Vec<GpuTelemetry>, NvmlError> {
    let nvml = init_nvml()?;
    let mut out = Vec::new();
    for position in 0..nvml.device_count()? {
        let Ok(device) = nvml.device_by_index(position) else {
            continue;
        };
        let ecc = device
            .total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile)
            .ok();
        let pending = device.are_pages_pending_retired().unwrap_or(false);
        out.push(GpuTelemetry {
            index: device.minor_number().unwrap_or(position),
            uuid: device.uuid().unwrap_or_default(),
            utilization_percent: device.utilization_rates().ok().map(|u| u.gpu),
            memory_used_bytes: device.memory_info().ok().map(|m| m.used),
            temperature_celsius: device
                .temperature(nvml_wrapper::enum_wrappers::device::TemperatureSensor::Gpu)
                .ok(),
            power_watts: device.power_usage().ok().map(|mw| mw as f64 / 1000.0),
            ecc_uncorrected_volatile: ecc,
            healthy: ecc.unwrap_or(0) == 0 && !pending,
        });
    }
    out.sort_by_key(|t| t.index);
    Ok(out)
}

/// Parses the XML that `nvidia-smi -q -x` prints into inventory entries, sorted by index.
///
/// index = `<minor_number>` (the GPU's position in the document when that is "N/A"),
/// uuid = `<uuid>`, model = `<product_name>`, memory = `<fb_memory_usage><total>` (0 when the
/// GPU reports none, as unified-memory GPUs do). See the module documentation for the health
/// rule. A document without `<gpu>` elements gives an empty list.
pub fn parse_nvidia_smi_xml(xml: &str) -> Result<Vec<GpuInfo>, GpuParseError> {
    let mut gpus: Vec<GpuInfo> = parse_gpus(xml)?.into_iter().map(|g| g.info).collect();
    sort_gpus(&mut gpus);
    Ok(gpus)
}

/// Parses the XML that `nvidia-smi -q -x` prints into one telemetry reading per GPU, sorted by
/// index. Only the index and the UUID are required; unreadable measurements become `None`.
pub fn parse_nvidia_smi_telemetry(xml: &str) -> Result<Vec<GpuTelemetry>, GpuParseError> {
    let doc = parse_document(xml)?;
    let mut readings = gpu_elements(&doc)?
        .enumerate()
        .map(|(position, gpu)| {
            Ok(GpuTelemetry {
                index: gpu_index(gpu, position)?,
                uuid: gpu_uuid(gpu, position)?,
                utilization_percent: text_at(gpu, &["utilization", "gpu_util"])
                    .and_then(parse_percent),
                memory_used_bytes: text_at(gpu, &["fb_memory_usage", "used"]).and_then(parse_bytes),
                temperature_celsius: text_at(gpu, &["temperature", "gpu_temp"])
                    .and_then(parse_celsius),
                power_watts: power_draw(gpu),
                ecc_uncorrected_volatile: volatile_uncorrectable_ecc(gpu),
                healthy: health_problems(gpu).is_empty(),
            })
        })
        .collect::<Result<Vec<_>, GpuParseError>>()?;
    readings.sort_by(|a, b| a.index.cmp(&b.index).then_with(|| a.uuid.cmp(&b.uuid)));
    Ok(readings)
}

// ---------------------------------------------------------------------------------------------
// Discovery plumbing
// ---------------------------------------------------------------------------------------------

/// A GPU with the reasons it is unhealthy (empty when healthy), so that discovery can log them.
#[derive(Debug)]
struct DiscoveredGpu {
    info: GpuInfo,
    problems: Vec<&'static str>,
}

/// Logs what was found and returns the inventory sorted by index.
fn finish(found: Vec<DiscoveredGpu>, source: &'static str) -> Vec<GpuInfo> {
    for gpu in &found {
        if !gpu.problems.is_empty() {
            warn!(
                index = gpu.info.index,
                uuid = %gpu.info.uuid,
                problems = ?gpu.problems,
                source,
                "GPU is unhealthy and will not be scheduled"
            );
        }
    }
    let mut gpus: Vec<GpuInfo> = found.into_iter().map(|g| g.info).collect();
    sort_gpus(&mut gpus);
    debug!(count = gpus.len(), source, "discovered GPUs");
    gpus
}

fn sort_gpus(gpus: &mut [GpuInfo]) {
    gpus.sort_by(|a, b| a.index.cmp(&b.index).then_with(|| a.uuid.cmp(&b.uuid)));
}

fn discover_nvml() -> Result<Vec<DiscoveredGpu>, NvmlError> {
    let nvml = init_nvml()?;
    let count = nvml.device_count()?;
    let mut gpus = Vec::new();
    for position in 0..count {
        match nvml
            .device_by_index(position)
            .and_then(|device| nvml_gpu(&device, position))
        {
            Ok(gpu) => gpus.push(gpu),
            // A GPU that cannot even say who it is cannot be scheduled; skip it.
            Err(e) => warn!(position, error = %e, "skipping a GPU that NVML cannot query"),
        }
    }
    Ok(gpus)
}

fn init_nvml() -> Result<Nvml, NvmlError> {
    match Nvml::init() {
        Err(NvmlError::LibloadingError(e)) => {
            debug!(error = %e, "unversioned NVML library not loadable, trying {NVML_VERSIONED_LIB}");
            Nvml::builder()
                .lib_path(OsStr::new(NVML_VERSIONED_LIB))
                .init()
        }
        other => other,
    }
}

fn nvml_gpu(device: &Device<'_>, position: u32) -> Result<DiscoveredGpu, NvmlError> {
    let uuid = device.uuid()?;
    let model = device.name()?;
    let memory_bytes = device.memory_info()?.total;
    let index = device.minor_number().unwrap_or_else(|e| {
        debug!(position, error = %e, "no minor number from NVML, using the enumeration index");
        position
    });

    let mut problems = Vec::new();
    match device.total_ecc_errors(MemoryError::Uncorrected, EccCounter::Volatile) {
        Ok(0) => {}
        Ok(_) => problems.push("volatile uncorrectable ECC errors"),
        Err(e) => note_nvml_health_error(e, "ECC error count", &mut problems),
    }
    match device.are_pages_pending_retired() {
        Ok(false) => {}
        Ok(true) => problems.push("memory pages pending retirement"),
        Err(e) => note_nvml_health_error(e, "page retirement state", &mut problems),
    }

    Ok(DiscoveredGpu {
        info: GpuInfo {
            index,
            uuid,
            model,
            memory_bytes,
            healthy: problems.is_empty(),
        },
        problems,
    })
}

/// A health query that fails because the GPU is gone or needs a reset makes the GPU unhealthy;
/// any other failure (typically "not supported") means "unknown", which counts as healthy.
fn note_nvml_health_error(error: NvmlError, what: &str, problems: &mut Vec<&'static str>) {
    match error {
        NvmlError::GpuLost => problems.push("GPU has fallen off the bus"),
        NvmlError::ResetRequired => problems.push("GPU requires a reset"),
        NvmlError::NotSupported => {}
        other => debug!(error = %other, "NVML could not read the {what}; treating it as unknown"),
    }
}

/// Why a command produced no usable output.
#[derive(Debug, thiserror::Error)]
enum CommandError {
    #[error("`{0}` is not installed")]
    NotFound(String),
    #[error("could not start `{program}`: {source}")]
    Spawn { program: String, source: io::Error },
    #[error("waiting for `{program}` failed: {source}")]
    Wait { program: String, source: io::Error },
    #[error("`{program}` did not finish within {timeout:?} and was killed")]
    TimedOut { program: String, timeout: Duration },
    #[error("`{program}` failed ({status}): {detail}")]
    Failed {
        program: String,
        status: ExitStatus,
        detail: String,
    },
}

/// Runs `program args…` and returns its stdout, killing it once `timeout` has passed.
fn run_with_timeout(
    program: &str,
    args: &[&str],
    timeout: Duration,
) -> Result<String, CommandError> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| match source.kind() {
            io::ErrorKind::NotFound => CommandError::NotFound(program.to_owned()),
            _ => CommandError::Spawn {
                program: program.to_owned(),
                source,
            },
        })?;
    let deadline = Instant::now() + timeout;
    // Read both pipes while waiting, so that a child with much output does not block on a
    // full pipe.
    let stdout = read_in_background(child.stdout.take());
    let stderr = read_in_background(child.stderr.take());

    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    // Kill errors only mean it has just exited; wait reaps it either way.
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(CommandError::TimedOut {
                        program: program.to_owned(),
                        timeout,
                    });
                }
                thread::sleep((deadline - now).min(Duration::from_millis(20)));
            }
            Err(source) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(CommandError::Wait {
                    program: program.to_owned(),
                    source,
                });
            }
        }
    };

    // The pipes close when the child exits, unless it left a grandchild holding them; never
    // wait past the deadline (plus a moment) for that.
    let grace = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(200));
    let stdout =
        String::from_utf8_lossy(&stdout.recv_timeout(grace).unwrap_or_default()).into_owned();
    if status.success() {
        return Ok(stdout);
    }
    let stderr = stderr
        .recv_timeout(Duration::from_millis(200))
        .unwrap_or_default();
    let stderr = String::from_utf8_lossy(&stderr);
    let detail = first_line(&stderr)
        .or_else(|| first_line(&stdout))
        .unwrap_or("no output")
        .to_owned();
    Err(CommandError::Failed {
        program: program.to_owned(),
        status,
        detail,
    })
}

/// Reads `pipe` to its end on a helper thread; the receiver gets everything that was read.
fn read_in_background<R: Read + Send + 'static>(pipe: Option<R>) -> mpsc::Receiver<Vec<u8>> {
    let (sender, receiver) = mpsc::channel();
    if let Some(pipe) = pipe {
        let spawned = thread::Builder::new()
            .name("gpu-cmd-output".to_owned())
            .spawn(move || {
                let mut buffer = Vec::new();
                // A read error leaves what was read so far, which is all there is to report.
                let _ = pipe.take(MAX_COMMAND_OUTPUT).read_to_end(&mut buffer);
                let _ = sender.send(buffer);
            });
        if let Err(e) = spawned {
            warn!(error = %e, "could not start a thread to read command output");
        }
    }
    receiver
}

/// The first non-blank line of `text`, trimmed and shortened for a log line.
fn first_line(text: &str) -> Option<&str> {
    let line = text.lines().map(str::trim).find(|l| !l.is_empty())?;
    Some(match line.char_indices().nth(200) {
        Some((cut, _)) => &line[..cut],
        None => line,
    })
}

// ---------------------------------------------------------------------------------------------
// nvidia-smi XML
// ---------------------------------------------------------------------------------------------

fn parse_document(xml: &str) -> Result<Document<'_>, GpuParseError> {
    // nvidia-smi starts its output with `<!DOCTYPE nvidia_smi_log SYSTEM "nvsmi_device_vNN.dtd">`;
    // the DTD is external, so allowing it only lets the declaration through.
    let options = ParsingOptions {
        allow_dtd: true,
        ..ParsingOptions::default()
    };
    Ok(Document::parse_with_options(xml, options)?)
}

/// The `<gpu>` elements directly below the `<nvidia_smi_log>` root.
fn gpu_elements<'a, 'input>(
    doc: &'a Document<'input>,
) -> Result<impl Iterator<Item = Node<'a, 'input>>, GpuParseError> {
    let root = doc.root_element();
    if root.tag_name().name() != "nvidia_smi_log" {
        return Err(GpuParseError::UnexpectedRoot(
            root.tag_name().name().to_owned(),
        ));
    }
    Ok(root.children().filter(|n| n.has_tag_name("gpu")))
}

/// Inventory entries in document order, with the reasons for unhealthiness.
fn parse_gpus(xml: &str) -> Result<Vec<DiscoveredGpu>, GpuParseError> {
    let doc = parse_document(xml)?;
    // Bound to a local so that the iterator borrowing `doc` is dropped before `doc` is.
    let gpus = gpu_elements(&doc)?
        .enumerate()
        .map(|(position, gpu)| parse_gpu(gpu, position))
        .collect();
    gpus
}

fn parse_gpu(gpu: Node<'_, '_>, position: usize) -> Result<DiscoveredGpu, GpuParseError> {
    const MEMORY: &str = "fb_memory_usage/total";
    let index = gpu_index(gpu, position)?;
    let uuid = gpu_uuid(gpu, position)?;
    let model = required_text(gpu, &["product_name"], "product_name", position)?.to_owned();
    let memory = required_text(gpu, &["fb_memory_usage", "total"], MEMORY, position)?;
    let memory_bytes = if is_not_available(memory) {
        0
    } else {
        parse_bytes(memory).ok_or_else(|| invalid(position, MEMORY, memory))?
    };
    let problems = health_problems(gpu);
    Ok(DiscoveredGpu {
        info: GpuInfo {
            index,
            uuid,
            model,
            memory_bytes,
            healthy: problems.is_empty(),
        },
        problems,
    })
}

/// `<minor_number>`, or the GPU's position in the document when the driver has none ("N/A").
fn gpu_index(gpu: Node<'_, '_>, position: usize) -> Result<u32, GpuParseError> {
    const FIELD: &str = "minor_number";
    let minor = required_text(gpu, &[FIELD], FIELD, position)?;
    if is_not_available(minor) {
        return u32::try_from(position).map_err(|_| invalid(position, FIELD, minor));
    }
    minor.parse().map_err(|_| invalid(position, FIELD, minor))
}

fn gpu_uuid(gpu: Node<'_, '_>, position: usize) -> Result<String, GpuParseError> {
    let uuid = required_text(gpu, &["uuid"], "uuid", position)?;
    if is_not_available(uuid) {
        return Err(invalid(position, "uuid", uuid));
    }
    Ok(uuid.to_owned())
}

/// Every reason the XML gives for not scheduling this GPU; empty when healthy.
fn health_problems(gpu: Node<'_, '_>) -> Vec<&'static str> {
    const YES_MEANS_UNHEALTHY: [(&[&str], &str); 8] = [
        (
            &["retired_pages", "pending_retirement"],
            "memory pages pending retirement",
        ),
        (
            &["retired_pages", "pending_blacklist"],
            "memory pages pending blacklisting",
        ),
        (
            &["remapped_rows", "remapped_row_pending"],
            "memory row remapping pending",
        ),
        (
            &["remapped_rows", "remapped_row_failure"],
            "memory row remapping failed",
        ),
        (
            &["ecc_errors", "channel_repair_pending"],
            "memory channel repair pending",
        ),
        (&["ecc_errors", "tpc_repair_pending"], "TPC repair pending"),
        (
            &["ecc_errors", "unrepairable_memory"],
            "unrepairable memory",
        ),
        (
            &["ecc_errors", "aggregate", "sram_threshold_exceeded"],
            "SRAM error threshold exceeded",
        ),
    ];

    let mut problems = Vec::new();
    if volatile_uncorrectable_ecc(gpu).is_some_and(|count| count > 0) {
        problems.push("volatile uncorrectable ECC errors");
    }
    for (path, problem) in YES_MEANS_UNHEALTHY {
        if text_at(gpu, path).is_some_and(|v| v.eq_ignore_ascii_case("yes")) {
            problems.push(problem);
        }
    }
    // Recent drivers say what the GPU needs to recover: "None", or a reset, reboot or drain.
    if text_at(gpu, &["gpu_recovery_action"])
        .is_some_and(|v| !v.eq_ignore_ascii_case("none") && !is_not_available(v))
    {
        problems.push("GPU needs a recovery action");
    }
    problems
}

/// Volatile uncorrectable ECC errors, summed over memory kinds; `None` when none is reported.
///
/// Recent drivers list `<ecc_errors><volatile>` counters such as `<dram_uncorrectable>` and
/// `<sram_uncorrectable_parity>`; older ones nest them as `<volatile><double_bit><total>`.
fn volatile_uncorrectable_ecc(gpu: Node<'_, '_>) -> Option<u64> {
    let volatile = child_at(gpu, &["ecc_errors", "volatile"])?;
    if let Some(total) = child_at(volatile, &["double_bit", "total"]) {
        return total.text().and_then(|t| t.trim().parse().ok());
    }
    volatile
        .children()
        .filter(|n| n.is_element() && n.tag_name().name().contains("uncorrectable"))
        .filter_map(|n| n.text().and_then(|t| t.trim().parse::<u64>().ok()))
        .reduce(u64::saturating_add)
}

/// Board power draw: the instantaneous reading, else the average (recent drivers print both
/// under `<gpu_power_readings>`), else `<power_readings><power_draw>` (older drivers).
fn power_draw(gpu: Node<'_, '_>) -> Option<f64> {
    [
        &["gpu_power_readings", "instant_power_draw"][..],
        &["gpu_power_readings", "average_power_draw"][..],
        &["gpu_power_readings", "power_draw"][..],
        &["power_readings", "power_draw"][..],
    ]
    .into_iter()
    .find_map(|path| text_at(gpu, path).and_then(parse_watts))
}

fn invalid(gpu: usize, field: &'static str, value: &str) -> GpuParseError {
    GpuParseError::InvalidValue {
        gpu,
        field,
        value: value.to_owned(),
    }
}

fn child_at<'a, 'input>(node: Node<'a, 'input>, path: &[&str]) -> Option<Node<'a, 'input>> {
    path.iter().try_fold(node, |node, name| {
        node.children().find(|c| c.has_tag_name(*name))
    })
}

/// The trimmed text of the element at `path` below `node`; `None` when absent or blank.
fn text_at<'a>(node: Node<'a, '_>, path: &[&str]) -> Option<&'a str> {
    child_at(node, path)?
        .text()
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

fn required_text<'a>(
    gpu: Node<'a, '_>,
    path: &[&str],
    field: &'static str,
    position: usize,
) -> Result<&'a str, GpuParseError> {
    text_at(gpu, path).ok_or(GpuParseError::MissingField {
        gpu: position,
        field,
    })
}

/// Whether nvidia-smi says it has no value: "N/A", "Not Supported" (with or without brackets).
fn is_not_available(value: &str) -> bool {
    let value = value
        .trim()
        .trim_start_matches('[')
        .trim_end_matches(']')
        .trim();
    value.eq_ignore_ascii_case("n/a") || value.eq_ignore_ascii_case("not supported")
}

/// Splits "81559 MiB" or "100%" into the number and the unit.
fn split_unit(value: &str) -> (&str, &str) {
    let value = value.trim();
    let end = value
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(value.len());
    (&value[..end], value[end..].trim())
}

/// "81559 MiB" → bytes. Accepts B, KiB, MiB, GiB and TiB (nvidia-smi prints MiB).
fn parse_bytes(value: &str) -> Option<u64> {
    let (number, unit) = split_unit(value);
    let scale: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return None,
    };
    number.parse::<u64>().ok()?.checked_mul(scale)
}

/// "100 %" → 100.
fn parse_percent(value: &str) -> Option<u32> {
    match split_unit(value) {
        (number, "%") => number.parse().ok(),
        _ => None,
    }
}

/// "79 C" → 79.
fn parse_celsius(value: &str) -> Option<u32> {
    match split_unit(value) {
        (number, "C") => number.parse().ok(),
        _ => None,
    }
}

/// "687.04 W" → 687.04.
fn parse_watts(value: &str) -> Option<f64> {
    match split_unit(value) {
        (number, "W") => number.parse::<f64>().ok().filter(|w| w.is_finite()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    const H100_UUID: &str = "GPU-0498b2c2-dec2-54b5-6b79-f83f8ca165a8";
    const H200_UUID: &str = "GPU-155e866b-9144-3f4c-ec25-f1c3d492b8c2";

    macro_rules! fixture_path {
        ($file:literal) => {
            concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../../shared/fixtures/gpu/",
                $file
            )
        };
    }

    fn read(path: &str) -> String {
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("cannot read fixture {path}: {e}"))
    }

    fn h100_idle() -> String {
        read(fixture_path!("h100/nvidia-smi-q.xml"))
    }

    /// One row of `query-gpu-idle.csv`: (uuid, name, memory.total in bytes).
    fn csv_inventory(path: &str) -> (String, String, u64) {
        let csv = read(path);
        let mut lines = csv.lines();
        let header: Vec<&str> = lines.next().expect("header").split(", ").collect();
        let row: Vec<&str> = lines.next().expect("one GPU row").split(", ").collect();
        let column = |name: &str| {
            let at = header
                .iter()
                .position(|h| h.starts_with(name))
                .unwrap_or_else(|| panic!("no {name} column in {path}"));
            row[at].trim().to_owned()
        };
        let memory = parse_bytes(&column("memory.total")).expect("memory.total in MiB");
        (column("uuid"), column("name"), memory)
    }

    /// The first `<gpu …>…</gpu>` element of a document, as text.
    fn gpu_element(xml: &str) -> &str {
        let start = xml.find("<gpu ").expect("a <gpu> element");
        let end = xml.rfind("</gpu>").expect("end of the <gpu> element") + "</gpu>".len();
        &xml[start..end]
    }

    /// `xml` with its `<gpu>` element replaced by `gpus`.
    fn with_gpus(xml: &str, gpus: &[String]) -> String {
        let element = gpu_element(xml);
        xml.replacen(element, &gpus.join("\n"), 1)
    }

    /// Changes the text of the first `<tag>` inside the first `<within>` block.
    fn set_within(xml: &str, within: &str, tag: &str, value: &str) -> String {
        let block = xml.find(&format!("<{within}>")).expect("block");
        let open = format!("<{tag}>");
        let start = block + xml[block..].find(&open).expect("tag") + open.len();
        let end = start + xml[start..].find('<').expect("closing tag");
        format!("{}{value}{}", &xml[..start], &xml[end..])
    }

    #[test]
    fn h100_fixture_gives_the_real_inventory() {
        let gpus = parse_nvidia_smi_xml(&h100_idle()).expect("parse");
        let (csv_uuid, csv_name, csv_memory) =
            csv_inventory(fixture_path!("h100/query-gpu-idle.csv"));
        assert_eq!(
            gpus,
            vec![GpuInfo {
                index: 0,
                uuid: H100_UUID.to_owned(),
                model: "NVIDIA H100 80GB HBM3".to_owned(),
                memory_bytes: 81_559 * MIB,
                healthy: true,
            }]
        );
        assert_eq!(gpus[0].uuid, csv_uuid);
        assert_eq!(gpus[0].model, csv_name);
        assert_eq!(gpus[0].memory_bytes, csv_memory);
        // What pynvml reported on the same machine (README).
        assert_eq!(gpus[0].memory_bytes, 85_520_809_984);
    }

    #[test]
    fn h200_fixture_gives_the_real_inventory() {
        let gpus =
            parse_nvidia_smi_xml(&read(fixture_path!("h200/nvidia-smi-q.xml"))).expect("parse");
        let (csv_uuid, csv_name, csv_memory) =
            csv_inventory(fixture_path!("h200/query-gpu-idle.csv"));
        assert_eq!(
            gpus,
            vec![GpuInfo {
                index: 0,
                uuid: H200_UUID.to_owned(),
                model: "NVIDIA H200".to_owned(),
                memory_bytes: 143_771 * MIB,
                healthy: true,
            }]
        );
        assert_eq!(gpus[0].uuid, csv_uuid);
        assert_eq!(gpus[0].model, csv_name);
        assert_eq!(gpus[0].memory_bytes, csv_memory);
    }

    #[test]
    fn busy_fixtures_give_the_same_inventory_as_idle_ones() {
        for (idle, busy) in [
            (
                fixture_path!("h100/nvidia-smi-q.xml"),
                fixture_path!("h100/nvidia-smi-q-busy.xml"),
            ),
            (
                fixture_path!("h200/nvidia-smi-q.xml"),
                fixture_path!("h200/nvidia-smi-q-busy.xml"),
            ),
        ] {
            assert_eq!(
                parse_nvidia_smi_xml(&read(idle)).expect("idle"),
                parse_nvidia_smi_xml(&read(busy)).expect("busy")
            );
        }
    }

    #[test]
    fn h100_idle_telemetry() {
        let readings = parse_nvidia_smi_telemetry(&h100_idle()).expect("parse");
        assert_eq!(
            readings,
            vec![GpuTelemetry {
                index: 0,
                uuid: H100_UUID.to_owned(),
                utilization_percent: Some(0),
                memory_used_bytes: Some(0),
                temperature_celsius: Some(51),
                power_watts: Some(78.21),
                ecc_uncorrected_volatile: Some(0),
                healthy: true,
            }]
        );
    }

    #[test]
    fn h100_busy_telemetry() {
        let readings =
            parse_nvidia_smi_telemetry(&read(fixture_path!("h100/nvidia-smi-q-busy.xml")))
                .expect("parse");
        assert_eq!(
            readings,
            vec![GpuTelemetry {
                index: 0,
                uuid: H100_UUID.to_owned(),
                utilization_percent: Some(100),
                memory_used_bytes: Some(1139 * MIB),
                temperature_celsius: Some(79),
                power_watts: Some(687.04),
                ecc_uncorrected_volatile: Some(0),
                healthy: true,
            }]
        );
        // The matmul job held the same memory in the CSV samples taken meanwhile.
        let csv = read(fixture_path!("h100/query-gpu-busy.csv"));
        let first: Vec<&str> = csv.lines().next().expect("a sample").split(", ").collect();
        assert_eq!(first[1], H100_UUID);
        assert_eq!(first[2].parse::<u64>().expect("MiB") * MIB, 1139 * MIB);
    }

    #[test]
    fn h200_busy_telemetry() {
        let readings =
            parse_nvidia_smi_telemetry(&read(fixture_path!("h200/nvidia-smi-q-busy.xml")))
                .expect("parse");
        assert_eq!(
            readings,
            vec![GpuTelemetry {
                index: 0,
                uuid: H200_UUID.to_owned(),
                utilization_percent: Some(100),
                memory_used_bytes: Some(1139 * MIB),
                temperature_celsius: Some(63),
                power_watts: Some(691.99),
                ecc_uncorrected_volatile: Some(0),
                healthy: true,
            }]
        );
    }

    #[test]
    fn malformed_xml_is_a_clear_error() {
        let truncated = &h100_idle()[..4000];
        for xml in ["", "not xml at all", "<nvidia_smi_log><gpu>", truncated] {
            let error = parse_nvidia_smi_xml(xml).expect_err(xml);
            assert!(matches!(error, GpuParseError::Xml(_)), "{error:?}");
            assert!(
                error
                    .to_string()
                    .starts_with("nvidia-smi XML is malformed: "),
                "{error}"
            );
            assert!(matches!(
                parse_nvidia_smi_telemetry(xml),
                Err(GpuParseError::Xml(_))
            ));
        }
    }

    #[test]
    fn other_xml_is_rejected() {
        let error = parse_nvidia_smi_xml("<html><gpu/></html>").expect_err("not nvidia-smi");
        assert!(matches!(error, GpuParseError::UnexpectedRoot(ref r) if r == "html"));
        assert_eq!(
            error.to_string(),
            "not nvidia-smi XML: the root element is <html>, expected <nvidia_smi_log>"
        );
    }

    #[test]
    fn document_without_gpus_gives_none() {
        let xml = "<?xml version=\"1.0\" ?>\n\
            <!DOCTYPE nvidia_smi_log SYSTEM \"nvsmi_device_v13.dtd\">\n\
            <nvidia_smi_log>\n\
            \t<driver_version>580.159.04</driver_version>\n\
            \t<attached_gpus>0</attached_gpus>\n\
            </nvidia_smi_log>\n";
        assert_eq!(parse_nvidia_smi_xml(xml).expect("parse"), vec![]);
        assert_eq!(parse_nvidia_smi_telemetry(xml).expect("parse"), vec![]);
        // Also what is left of a real document once its GPU is cut out.
        let xml = with_gpus(&h100_idle(), &[]);
        assert_eq!(parse_nvidia_smi_xml(&xml).expect("parse"), vec![]);
    }

    fn second_gpu(xml: &str, minor: &str, uuid: &str) -> String {
        gpu_element(xml)
            .replace(
                "<minor_number>0</minor_number>",
                &format!("<minor_number>{minor}</minor_number>"),
            )
            .replace(H100_UUID, uuid)
            .replace("00000000:00:06.0", "00000000:00:07.0")
    }

    #[test]
    fn two_gpus_are_sorted_by_minor_number() {
        let xml = h100_idle();
        let other = "GPU-11111111-2222-3333-4444-555555555555";
        // The GPU with minor number 1 comes first in the document.
        let doc = with_gpus(
            &xml,
            &[second_gpu(&xml, "1", other), gpu_element(&xml).to_owned()],
        );
        let gpus = parse_nvidia_smi_xml(&doc).expect("parse");
        let found: Vec<(u32, &str)> = gpus.iter().map(|g| (g.index, g.uuid.as_str())).collect();
        assert_eq!(found, vec![(0, H100_UUID), (1, other)]);
        assert!(gpus
            .iter()
            .all(|g| g.healthy && g.memory_bytes == 81_559 * MIB));

        let readings = parse_nvidia_smi_telemetry(&doc).expect("parse");
        let found: Vec<(u32, &str)> = readings
            .iter()
            .map(|r| (r.index, r.uuid.as_str()))
            .collect();
        assert_eq!(found, vec![(0, H100_UUID), (1, other)]);
    }

    #[test]
    fn missing_minor_numbers_fall_back_to_document_order() {
        let xml = h100_idle();
        let other = "GPU-11111111-2222-3333-4444-555555555555";
        let first = second_gpu(&xml, "N/A", H100_UUID);
        let doc = with_gpus(&xml, &[first, second_gpu(&xml, "N/A", other)]);
        let gpus = parse_nvidia_smi_xml(&doc).expect("parse");
        let found: Vec<(u32, &str)> = gpus.iter().map(|g| (g.index, g.uuid.as_str())).collect();
        assert_eq!(found, vec![(0, H100_UUID), (1, other)]);
    }

    #[test]
    fn fatal_xids_are_told_from_application_faults() {
        for fatal in [48, 63, 64, 74, 79, 95, 119] {
            assert!(xid_is_fatal(fatal), "{fatal}");
        }
        for benign in [13, 31, 43, 45, 94] {
            assert!(!xid_is_fatal(benign), "{benign}");
        }
    }

    #[test]
    fn volatile_uncorrectable_ecc_errors_make_a_gpu_unhealthy() {
        let xml = set_within(&h100_idle(), "volatile", "dram_uncorrectable", "2");
        let gpus = parse_nvidia_smi_xml(&xml).expect("parse");
        assert_eq!(gpus.len(), 1);
        assert!(!gpus[0].healthy);
        let readings = parse_nvidia_smi_telemetry(&xml).expect("parse");
        assert_eq!(readings[0].ecc_uncorrected_volatile, Some(2));
        assert!(!readings[0].healthy);

        // SRAM counters count too, and add up.
        let xml = set_within(&xml, "volatile", "sram_uncorrectable_secded", "3");
        let readings = parse_nvidia_smi_telemetry(&xml).expect("parse");
        assert_eq!(readings[0].ecc_uncorrected_volatile, Some(5));

        // Corrected errors and aggregate (lifetime) counts alone do not.
        let xml = set_within(&h100_idle(), "volatile", "dram_correctable", "7");
        let xml = set_within(&xml, "aggregate", "dram_uncorrectable", "1");
        assert!(parse_nvidia_smi_xml(&xml).expect("parse")[0].healthy);
    }

    #[test]
    fn pending_or_failed_memory_repair_makes_a_gpu_unhealthy() {
        for (block, tag) in [
            ("remapped_rows", "remapped_row_pending"),
            ("remapped_rows", "remapped_row_failure"),
            ("retired_pages", "pending_retirement"),
            ("ecc_errors", "unrepairable_memory"),
        ] {
            let xml = set_within(&h100_idle(), block, tag, "Yes");
            let gpus = parse_nvidia_smi_xml(&xml).expect("parse");
            assert!(!gpus[0].healthy, "{tag} = Yes");
            assert!(!parse_nvidia_smi_telemetry(&xml).expect("parse")[0].healthy);
        }
        let xml = h100_idle().replace(
            "<gpu_recovery_action>None</gpu_recovery_action>",
            "<gpu_recovery_action>Reset</gpu_recovery_action>",
        );
        assert!(!parse_nvidia_smi_xml(&xml).expect("parse")[0].healthy);
    }

    #[test]
    fn unreported_ecc_counts_are_unknown_not_unhealthy() {
        let mut xml = h100_idle();
        for tag in [
            "sram_uncorrectable_parity",
            "sram_uncorrectable_secded",
            "dram_uncorrectable",
        ] {
            xml = set_within(&xml, "volatile", tag, "N/A");
        }
        assert!(parse_nvidia_smi_xml(&xml).expect("parse")[0].healthy);
        let reading = &parse_nvidia_smi_telemetry(&xml).expect("parse")[0];
        assert_eq!(reading.ecc_uncorrected_volatile, None);
        assert!(reading.healthy);
    }

    #[test]
    fn older_driver_layout_is_understood() {
        let xml = "<nvidia_smi_log><gpu id=\"00000000:3B:00.0\">\
            <product_name>Tesla V100-SXM2-16GB</product_name>\
            <uuid>GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee</uuid>\
            <minor_number>3</minor_number>\
            <fb_memory_usage><total>16160 MiB</total><used>5 MiB</used></fb_memory_usage>\
            <utilization><gpu_util>7 %</gpu_util></utilization>\
            <ecc_errors><volatile>\
            <single_bit><device_memory>4</device_memory><total>4</total></single_bit>\
            <double_bit><device_memory>1</device_memory><total>1</total></double_bit>\
            </volatile></ecc_errors>\
            <temperature><gpu_temp>N/A</gpu_temp></temperature>\
            <power_readings><power_draw>41.50 W</power_draw></power_readings>\
            </gpu></nvidia_smi_log>";
        let gpus = parse_nvidia_smi_xml(xml).expect("parse");
        assert_eq!(gpus[0].index, 3);
        assert_eq!(gpus[0].memory_bytes, 16_160 * MIB);
        assert!(!gpus[0].healthy);
        let reading = &parse_nvidia_smi_telemetry(xml).expect("parse")[0];
        assert_eq!(reading.ecc_uncorrected_volatile, Some(1));
        assert_eq!(reading.utilization_percent, Some(7));
        assert_eq!(reading.memory_used_bytes, Some(5 * MIB));
        assert_eq!(reading.temperature_celsius, None);
        assert_eq!(reading.power_watts, Some(41.5));
    }

    #[test]
    fn missing_or_unreadable_required_fields_are_errors() {
        let xml = h100_idle().replace(&format!("<uuid>{H100_UUID}</uuid>"), "");
        let error = parse_nvidia_smi_xml(&xml).expect_err("no uuid");
        assert!(matches!(
            error,
            GpuParseError::MissingField {
                gpu: 0,
                field: "uuid"
            }
        ));
        assert_eq!(
            error.to_string(),
            "GPU #0 in nvidia-smi XML has no <uuid> value"
        );
        assert!(parse_nvidia_smi_telemetry(&xml).is_err());

        let xml = h100_idle().replace("<total>81559 MiB</total>", "<total>lots</total>");
        let error = parse_nvidia_smi_xml(&xml).expect_err("bad memory");
        assert_eq!(
            error.to_string(),
            "GPU #0 in nvidia-smi XML has an unreadable <fb_memory_usage/total> value \"lots\""
        );

        let xml = h100_idle().replace(
            "<minor_number>0</minor_number>",
            "<minor_number>-1</minor_number>",
        );
        assert!(matches!(
            parse_nvidia_smi_xml(&xml),
            Err(GpuParseError::InvalidValue {
                field: "minor_number",
                ..
            })
        ));
    }

    #[test]
    fn unreported_total_memory_is_zero() {
        let xml = h100_idle().replace("<total>81559 MiB</total>", "<total>N/A</total>");
        assert_eq!(
            parse_nvidia_smi_xml(&xml).expect("parse")[0].memory_bytes,
            0
        );
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("81559 MiB"), Some(85_520_809_984));
        assert_eq!(parse_bytes("2 GiB"), Some(2 << 30));
        assert_eq!(parse_bytes("512"), Some(512));
        assert_eq!(parse_bytes("N/A"), None);
        assert_eq!(parse_bytes("12 XB"), None);
        assert_eq!(parse_bytes("99999999999999 TiB"), None);
        assert_eq!(parse_percent("100 %"), Some(100));
        assert_eq!(parse_percent("33%"), Some(33));
        assert_eq!(parse_percent("N/A"), None);
        assert_eq!(parse_celsius("-8 C"), None);
        assert_eq!(parse_celsius("79 C"), Some(79));
        assert_eq!(parse_watts("687.04 W"), Some(687.04));
        assert_eq!(parse_watts("700.00 MHz"), None);
        assert!(is_not_available("[Not Supported]"));
        assert!(is_not_available("N/A"));
        assert!(!is_not_available("0"));
    }

    #[test]
    fn command_output_is_returned() {
        let command = concat!("cat '", fixture_path!("h100/nvidia-smi-q.xml"), "'");
        let xml = run_with_timeout("sh", &["-c", command], Duration::from_secs(10)).expect("run");
        assert_eq!(
            parse_nvidia_smi_xml(&xml).expect("parse")[0].uuid,
            H100_UUID
        );
    }

    #[test]
    fn slow_command_is_killed_at_the_timeout() {
        let started = Instant::now();
        let error = run_with_timeout("sh", &["-c", "exec sleep 30"], Duration::from_millis(300))
            .expect_err("timeout");
        assert!(matches!(error, CommandError::TimedOut { .. }), "{error}");
        assert!(started.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn missing_or_failing_command_is_reported() {
        let error = run_with_timeout("tessera-no-such-binary", &[], Duration::from_secs(5))
            .expect_err("missing");
        assert!(matches!(error, CommandError::NotFound(_)), "{error}");

        let error = run_with_timeout(
            "sh",
            &["-c", "echo 'NVIDIA-SMI has failed' >&2; exit 9"],
            Duration::from_secs(5),
        )
        .expect_err("fails");
        assert!(
            matches!(error, CommandError::Failed { ref detail, .. } if detail == "NVIDIA-SMI has failed"),
            "{error}"
        );
    }

    #[test]
    fn discover_never_fails() {
        let (gpus, source) = discover();
        assert!([SOURCE_NVML, SOURCE_NVIDIA_SMI, SOURCE_NONE].contains(&source));
        assert_eq!(source == SOURCE_NONE, gpus.is_empty());
        assert!(gpus.windows(2).all(|w| w[0].index <= w[1].index));
    }
}
