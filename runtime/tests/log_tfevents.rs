//! TensorBoard event files (spec §10.2): TFRecord framing, the `Event` protobuf, flush semantics.
use qplc_runtime::log::tfevents::{masked_crc32c, read_events, read_scalars, EventWriter};
use std::path::Path;

fn only_file(dir: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

#[test]
fn masked_crc_matches_tensorflow_definition() {
    // CRC32C("123456789") = 0xE3069283 (the standard check value); masked by
    // ((crc >> 15) | (crc << 17)) + 0xa282ead8.
    assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    assert_eq!(masked_crc32c(b"123456789"), 0xC78A_B0E5);
}

#[test]
fn event_file_is_named_after_unix_time_and_host_in_the_given_dir() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("run");
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let w = EventWriter::create(&dir).unwrap();
    let name = w.path().file_name().unwrap().to_str().unwrap().to_string();
    assert_eq!(w.path().parent().unwrap(), dir);
    let rest = name.strip_prefix("events.out.tfevents.").unwrap();
    let (secs, host) = rest.split_once('.').unwrap();
    let secs: u64 = secs.parse().unwrap();
    assert!(secs >= before && secs <= before + 2, "{name}");
    assert!(!host.is_empty());
    assert_eq!(only_file(&dir), w.path());
}

#[test]
fn first_record_declares_brain_event_2() {
    let tmp = tempfile::tempdir().unwrap();
    let w = EventWriter::create(tmp.path()).unwrap();
    let events = read_events(w.path()).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
    assert!(events[0].scalars.is_empty());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - events[0].wall_time).abs() < 60.0);
}

#[test]
fn scalars_round_trip_with_tag_step_and_value() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    w.add_scalar("eval/loss", 2.5, 0).unwrap();
    w.add_scalars(&[("train/loss", 2.25), ("train/lr", 1.95e-5)], 1)
        .unwrap();
    // Steps beyond one varint byte and beyond 32 bits.
    w.add_scalar("train/loss", -0.0, 300).unwrap();
    w.add_scalar("train/loss", 1.0, 1 << 40).unwrap();
    w.flush().unwrap();
    let got = read_scalars(w.path()).unwrap();
    let want: Vec<(String, i64, f32)> = vec![
        ("eval/loss".into(), 0, 2.5),
        ("train/loss".into(), 1, 2.25),
        ("train/lr".into(), 1, 1.95e-5),
        ("train/loss".into(), 300, -0.0),
        ("train/loss".into(), 1 << 40, 1.0),
    ];
    assert_eq!(got, want);
    // One Event per scalar, after the file-version record.
    assert_eq!(read_events(w.path()).unwrap().len(), 6);
}

#[test]
fn file_is_valid_after_each_flush_and_unflushed_records_are_not_yet_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    for step in 1..=3i64 {
        w.add_scalar("train/loss", step as f32, step).unwrap();
        w.flush().unwrap();
        // Read while the writer is still open, as TensorBoard does during training.
        let got = read_scalars(w.path()).unwrap();
        assert_eq!(got.len(), step as usize);
        assert_eq!(got.last().unwrap().1, step);
    }
    // A record added but not flushed is not on disk (what a crash would lose) and does not
    // make the file invalid.
    w.add_scalar("train/loss", 4.0, 4).unwrap();
    assert_eq!(read_scalars(w.path()).unwrap().len(), 3);
    drop(w);
    let path = only_file(tmp.path());
    assert_eq!(read_scalars(&path).unwrap().len(), 4, "drop flushes");
}

#[test]
fn records_use_tfrecord_framing() {
    let tmp = tempfile::tempdir().unwrap();
    let w = EventWriter::create(tmp.path()).unwrap();
    let bytes = std::fs::read(w.path()).unwrap();
    let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(bytes.len(), 8 + 4 + len + 4, "one record");
    assert_eq!(
        u32::from_le_bytes(bytes[8..12].try_into().unwrap()),
        masked_crc32c(&bytes[..8])
    );
    let data = &bytes[12..12 + len];
    assert_eq!(
        u32::from_le_bytes(bytes[12 + len..].try_into().unwrap()),
        masked_crc32c(data)
    );
    // Event: field 1 (double wall_time) comes first, then field 3 (file_version) as a string.
    assert_eq!(data[0], 0x09);
    assert_eq!(&data[9..11], &[0x1a, 13]);
    assert_eq!(&data[11..], b"brain.Event:2");
}

#[test]
fn reader_rejects_a_corrupted_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    w.add_scalar("train/loss", 1.5, 1).unwrap();
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);
    let mut bytes = std::fs::read(&path).unwrap();
    let n = bytes.len();
    bytes[n - 6] ^= 0x01; // inside the float of the last record
    std::fs::write(&path, &bytes).unwrap();
    let err = read_scalars(&path).unwrap_err().to_string();
    assert!(err.contains("data CRC mismatch"), "{err}");
}

#[test]
fn reader_rejects_a_truncated_record() {
    let tmp = tempfile::tempdir().unwrap();
    let mut w = EventWriter::create(tmp.path()).unwrap();
    w.add_scalar("train/loss", 1.5, 1).unwrap();
    w.flush().unwrap();
    let path = w.path().to_path_buf();
    drop(w);
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
    let err = read_scalars(&path).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");
}

/// Writes a sample event file for `scripts/check_tfevents.py` (TensorBoard's own reader):
/// `cargo test -p qplc-runtime --test log_tfevents -- --ignored --nocapture`, then run the script
/// on the printed path.
#[test]
#[ignore = "writes a file under target/ for the TensorBoard cross-check"]
fn write_sample_event_file_for_tensorboard() {
    use qplc_compiler::config::Mode;
    use qplc_runtime::log::{aggregate, step_scalars, StepMetrics};
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("tfevents_sample");
    let _ = std::fs::remove_dir_all(&dir);
    let mut w = EventWriter::create(&dir).unwrap();
    w.add_scalar("eval/loss", 3.0, 0).unwrap();
    w.flush().unwrap();
    for step in 1..=5i64 {
        let m = StepMetrics {
            loss: 3.0 - 0.25 * step as f64,
            lr: 2e-5 * step as f64 / 5.0,
            norms: aggregate(&[0.1 * step as f64, 0.2 * step as f64]),
            weight_decay: aggregate(&[1e-3, 3e-3]),
            orthogonality: aggregate(&[]),
        };
        w.add_scalars(&step_scalars(Mode::Lora, true, &m), step)
            .unwrap();
        w.flush().unwrap();
    }
    w.add_scalar("eval/loss", 1.75, 5).unwrap();
    w.flush().unwrap();
    println!("{}", w.path().display());
}
