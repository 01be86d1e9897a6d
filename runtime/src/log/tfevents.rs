//! TensorBoard event files, written directly (spec §10.2; DESIGN.md "Files the user gets").
//!
//! An event file is a sequence of TFRecords, each
//! `u64 length (LE) | u32 masked_crc32c(length) | data | u32 masked_crc32c(data)`,
//! whose data is one protobuf `tensorflow.Event`. We encode the handful of fields TensorBoard
//! needs by hand rather than pull in a protobuf toolchain, and the Rust TensorBoard crates are
//! unmaintained (DESIGN.md dependency table). The first record carries
//! `file_version = "brain.Event:2"`, which TensorBoard's loader uses to recognise the format.
//!
//! Records are buffered and reach the file on [`EventWriter::flush`], which the training loop
//! calls once per step: every record is written whole before the next, so after a flush the file
//! is a valid event file and a crash loses at most the records added since the last flush.

use anyhow::{bail, ensure, Context, Result};
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// What TensorBoard expects in the first record of a file (`tensorflow/core/util/event.proto`).
pub const FILE_VERSION: &str = "brain.Event:2";

/// Writes `events.out.tfevents.<unix time>.<hostname>` in one directory.
pub struct EventWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl EventWriter {
    /// Creates a new event file in `dir` (created if missing) and writes the file-version record.
    ///
    /// The name carries the process id, as TensorFlow's own writer does, so a resumed run
    /// started within the same second gets a file of its own; the file is opened with
    /// `create_new`, so an existing file is reported rather than overwritten.
    pub fn create(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| {
            format!("cannot create the TensorBoard directory {}", dir.display())
        })?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let host = gethostname::gethostname().to_string_lossy().into_owned();
        let path = dir.join(format!(
            "events.out.tfevents.{}.{host}.{}",
            now.as_secs(),
            std::process::id()
        ));
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("cannot create TensorBoard event file {}", path.display()))?;
        let mut writer = EventWriter {
            path,
            out: BufWriter::new(file),
        };
        let first = encode_event(wall_time(), 0, Payload::FileVersion(FILE_VERSION));
        writer.write_record(&first)?;
        writer.flush()?;
        Ok(writer)
    }

    /// The event file being written.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Buffers one scalar (one `Event` with a one-value `Summary`, as TensorBoard's own
    /// `SummaryWriter.add_scalar` writes it). TensorBoard stores `simple_value` as float32.
    pub fn add_scalar(&mut self, tag: &str, value: f32, step: i64) -> Result<()> {
        let event = encode_event(wall_time(), step, Payload::Scalar { tag, value });
        self.write_record(&event)
    }

    /// Buffers several scalars of one step.
    pub fn add_scalars(&mut self, scalars: &[(&str, f32)], step: i64) -> Result<()> {
        for &(tag, value) in scalars {
            self.add_scalar(tag, value, step)?;
        }
        Ok(())
    }

    /// Writes the buffered records to the file.
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| {
            format!(
                "cannot write TensorBoard event file {}",
                self.path.display()
            )
        })
    }

    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let mut record = Vec::with_capacity(data.len() + 16);
        record.extend_from_slice(&len);
        record.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
        record.extend_from_slice(data);
        record.extend_from_slice(&masked_crc32c(data).to_le_bytes());
        self.out.write_all(&record).with_context(|| {
            format!(
                "cannot write TensorBoard event file {}",
                self.path.display()
            )
        })
    }
}

impl Drop for EventWriter {
    fn drop(&mut self) {
        // Best effort: a writer dropped during unwinding still leaves its records on disk.
        let _ = self.out.flush();
    }
}

fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// TFRecord's CRC mask (`tensorflow/core/lib/hash/crc32c.h`): rotating and offsetting the CRC
/// keeps a CRC computed over data that itself contains CRCs from being trivially zero.
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8, wrapping.
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

enum Payload<'a> {
    FileVersion(&'a str),
    Scalar { tag: &'a str, value: f32 },
}

// Protobuf wire types.
const VARINT: u8 = 0;
const FIXED64: u8 = 1;
const LEN: u8 = 2;
const FIXED32: u8 = 5;

fn key(out: &mut Vec<u8>, field: u8, wire: u8) {
    // Every field number we use is < 16, so the key is one byte.
    out.push((field << 3) | wire);
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_field(out: &mut Vec<u8>, field: u8, bytes: &[u8]) {
    key(out, field, LEN);
    varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event { double wall_time = 1; int64 step = 2; oneof { string file_version = 3;
/// Summary summary = 5; } }`, `Summary { repeated Value value = 1; }`,
/// `Summary.Value { string tag = 1; float simple_value = 2; }`.
fn encode_event(wall_time: f64, step: i64, payload: Payload) -> Vec<u8> {
    let mut event = Vec::with_capacity(64);
    key(&mut event, 1, FIXED64);
    event.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        // proto3 omits default values; int64 is a plain (two's complement) varint.
        key(&mut event, 2, VARINT);
        varint(&mut event, step as u64);
    }
    match payload {
        Payload::FileVersion(v) => len_field(&mut event, 3, v.as_bytes()),
        Payload::Scalar { tag, value } => {
            let mut val = Vec::with_capacity(tag.len() + 8);
            len_field(&mut val, 1, tag.as_bytes());
            key(&mut val, 2, FIXED32);
            val.extend_from_slice(&value.to_le_bytes());
            let mut summary = Vec::with_capacity(val.len() + 2);
            len_field(&mut summary, 1, &val);
            len_field(&mut event, 5, &summary);
        }
    }
    event
}

/// One decoded `Event` (only the fields this writer produces).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub wall_time: f64,
    pub step: i64,
    pub file_version: Option<String>,
    /// `(tag, simple_value)` of each summary value.
    pub scalars: Vec<(String, f32)>,
}

/// Reads every record of an event file, verifying both CRCs of each record and that the file
/// ends on a record boundary.
pub fn read_events(path: &Path) -> Result<Vec<Event>> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut events = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        ensure!(
            rest.len() >= 12,
            "{}: truncated record header at byte {at}",
            path.display()
        );
        let len_bytes = &rest[..8];
        let len = u64::from_le_bytes(len_bytes.try_into().unwrap()) as usize;
        let len_crc = u32::from_le_bytes(rest[8..12].try_into().unwrap());
        ensure!(
            len_crc == masked_crc32c(len_bytes),
            "{}: length CRC mismatch in the record at byte {at}",
            path.display()
        );
        ensure!(
            rest.len() - 12 >= len.saturating_add(4),
            "{}: truncated record data at byte {at}",
            path.display()
        );
        let data = &rest[12..12 + len];
        let data_crc = u32::from_le_bytes(rest[12 + len..16 + len].try_into().unwrap());
        ensure!(
            data_crc == masked_crc32c(data),
            "{}: data CRC mismatch in the record at byte {at}",
            path.display()
        );
        events.push(
            decode_event(data)
                .with_context(|| format!("{}: record at byte {at}", path.display()))?,
        );
        at += 16 + len;
    }
    Ok(events)
}

/// Every scalar of an event file as `(tag, step, value)`, in file order (CRCs verified).
pub fn read_scalars(path: &Path) -> Result<Vec<(String, i64, f32)>> {
    Ok(read_events(path)?
        .into_iter()
        .flat_map(|e| {
            let step = e.step;
            e.scalars.into_iter().map(move |(tag, v)| (tag, step, v))
        })
        .collect())
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        ensure!(self.bytes.len() - self.at >= n, "truncated protobuf field");
        let s = &self.bytes[self.at..self.at + n];
        self.at += n;
        Ok(s)
    }

    fn varint(&mut self) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.take(1)?[0];
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }

    /// Returns (field number, wire type).
    fn key(&mut self) -> Result<(u64, u8)> {
        let k = self.varint()?;
        Ok((k >> 3, (k & 7) as u8))
    }

    fn field(&mut self, wire: u8) -> Result<&'a [u8]> {
        match wire {
            VARINT => {
                let start = self.at;
                self.varint()?;
                Ok(&self.bytes[start..self.at])
            }
            FIXED64 => self.take(8),
            LEN => {
                let n = self.varint()? as usize;
                self.take(n)
            }
            FIXED32 => self.take(4),
            w => bail!("unsupported protobuf wire type {w}"),
        }
    }
}

fn decode_event(data: &[u8]) -> Result<Event> {
    let mut event = Event {
        wall_time: 0.0,
        step: 0,
        file_version: None,
        scalars: Vec::new(),
    };
    let mut c = Cursor { bytes: data, at: 0 };
    while !c.done() {
        let (field, wire) = c.key()?;
        match (field, wire) {
            (1, FIXED64) => event.wall_time = f64::from_le_bytes(c.take(8)?.try_into().unwrap()),
            (2, VARINT) => event.step = c.varint()? as i64,
            (3, LEN) => event.file_version = Some(String::from_utf8(c.field(LEN)?.to_vec())?),
            (5, LEN) => decode_summary(c.field(LEN)?, &mut event.scalars)?,
            (_, w) => {
                c.field(w)?;
            }
        }
    }
    Ok(event)
}

fn decode_summary(data: &[u8], scalars: &mut Vec<(String, f32)>) -> Result<()> {
    let mut c = Cursor { bytes: data, at: 0 };
    while !c.done() {
        let (field, wire) = c.key()?;
        let body = c.field(wire)?;
        if (field, wire) != (1, LEN) {
            continue;
        }
        let mut v = Cursor { bytes: body, at: 0 };
        let (mut tag, mut value) = (None, None);
        while !v.done() {
            let (f, w) = v.key()?;
            match (f, w) {
                (1, LEN) => tag = Some(String::from_utf8(v.field(LEN)?.to_vec())?),
                (2, FIXED32) => value = Some(f32::from_le_bytes(v.take(4)?.try_into().unwrap())),
                (_, w) => {
                    v.field(w)?;
                }
            }
        }
        match (tag, value) {
            (Some(t), Some(x)) => scalars.push((t, x)),
            (t, _) => bail!("summary value {t:?} has no simple_value"),
        }
    }
    Ok(())
}
