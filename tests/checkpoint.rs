//! Checkpoint files: round trip, atomic replacement, and clear errors for files that do not match.

use caml_wgpu::checkpoint::{self, Entry, StateDict};
use std::collections::HashMap;

fn dict() -> StateDict {
    let mut d = StateDict::new();
    d.insert("encoder1.block_one.conv.0.weight".into(), Entry::f32(&[2, 1, 1, 1, 1], vec![0.5, -1.25]));
    d.insert("encoder1.block_one.conv.1.num_batches_tracked".into(), Entry::i64(&[], vec![7]));
    d
}

#[test]
fn state_dict_round_trips_with_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let meta = HashMap::from([("width".to_string(), "16".to_string())]);
    checkpoint::save(&path, &dict(), &meta).unwrap();
    let (back, m) = checkpoint::load(&path).unwrap();
    assert_eq!(back, dict());
    assert_eq!(m, meta);
    // Rewriting replaces the file and leaves no temporary behind.
    checkpoint::save(&path, &dict(), &HashMap::new()).unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

#[test]
fn mismatched_checkpoints_list_every_problem() {
    let path = std::path::Path::new("ck.safetensors");
    let expected = vec![
        ("encoder1.block_one.conv.0.weight".to_string(), vec![16, 1, 3, 3, 3]),
        ("encoder1.block_one.conv.0.bias".to_string(), vec![16]),
    ];
    let mut d = dict();
    d.insert("stray".into(), Entry::f32(&[1], vec![0.0]));
    let err = checkpoint::check_against(path, &d, &expected).unwrap_err().to_string();
    assert!(err.contains("ck.safetensors"), "{err}");
    assert!(err.contains("missing (1): encoder1.block_one.conv.0.bias"), "{err}");
    assert!(err.contains("unexpected (2)"), "{err}");
    assert!(err.contains("wrong shape (1): encoder1.block_one.conv.0.weight"), "{err}");
}

#[test]
fn corrupt_and_truncated_files_are_named_in_the_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    checkpoint::save(&path, &dict(), &HashMap::new()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = format!("{:#}", checkpoint::load(&path).unwrap_err());
    assert!(err.contains("bad.safetensors"), "{err}");
    std::fs::write(&path, b"not a checkpoint at all").unwrap();
    assert!(format!("{:#}", checkpoint::load(&path).unwrap_err()).contains("bad.safetensors"));
    let missing = dir.path().join("nope.safetensors");
    assert!(format!("{:#}", checkpoint::load(&missing).unwrap_err()).contains("nope.safetensors"));
}
