//! Checkpoints: safetensors files keyed by the reference's state_dict names, written atomically.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{Context, Result, bail};
use safetensors::{Dtype, SafeTensors, tensor::TensorView};

#[derive(Clone, Debug, PartialEq)]
pub enum Data {
    F32(Vec<f32>),
    /// BatchNorm's num_batches_tracked, as PyTorch stores it.
    I64(Vec<i64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Entry {
    pub shape: Vec<usize>,
    pub data: Data,
}

impl Entry {
    pub fn f32(shape: &[usize], data: Vec<f32>) -> Entry {
        Entry { shape: shape.to_vec(), data: Data::F32(data) }
    }
    pub fn i64(shape: &[usize], data: Vec<i64>) -> Entry {
        Entry { shape: shape.to_vec(), data: Data::I64(data) }
    }
    pub fn as_f32(&self) -> Option<&[f32]> {
        match &self.data {
            Data::F32(v) => Some(v),
            Data::I64(_) => None,
        }
    }
}

pub type StateDict = BTreeMap<String, Entry>;

/// Saves a state dict (and string metadata) as safetensors, atomically.
pub fn save(path: &Path, dict: &StateDict, metadata: &HashMap<String, String>) -> Result<()> {
    let bytes: Vec<(String, Vec<u8>, Dtype, Vec<usize>)> = dict
        .iter()
        .map(|(k, e)| {
            let (raw, dt) = match &e.data {
                Data::F32(v) => (bytemuck::cast_slice(v).to_vec(), Dtype::F32),
                Data::I64(v) => (bytemuck::cast_slice(v).to_vec(), Dtype::I64),
            };
            (k.clone(), raw, dt, e.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, raw, dt, shape)| Ok((k.clone(), TensorView::new(*dt, shape.clone(), raw)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()
        .with_context(|| format!("cannot serialize {}", path.display()))?;
    let meta = (!metadata.is_empty()).then(|| metadata.clone());
    let out = safetensors::serialize(views, meta)
        .with_context(|| format!("cannot serialize {}", path.display()))?;
    crate::fsutil::write_atomic(path, &out)
}

/// Loads a safetensors file: F32, F16, BF16 and F64 tensors become f32; integer tensors i64.
pub fn load(path: &Path) -> Result<(StateDict, HashMap<String, String>)> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read checkpoint {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{} is not a valid safetensors file", path.display()))?;
    let (_, header) = SafeTensors::read_metadata(&bytes)
        .with_context(|| format!("{} has an unreadable safetensors header", path.display()))?;
    let mut dict = StateDict::new();
    for (name, view) in st.tensors() {
        let raw = view.data();
        let data = match view.dtype() {
            Dtype::F32 => {
                Data::F32(raw.chunks_exact(4).map(|c| f32::from_le_bytes(c.try_into().unwrap())).collect())
            }
            Dtype::F64 => Data::F32(
                raw.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32).collect(),
            ),
            Dtype::F16 => Data::F32(
                raw.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            ),
            Dtype::BF16 => Data::F32(
                raw.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            ),
            Dtype::I64 => {
                Data::I64(raw.chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect())
            }
            Dtype::I32 => Data::I64(
                raw.chunks_exact(4).map(|c| i32::from_le_bytes(c.try_into().unwrap()) as i64).collect(),
            ),
            other => bail!("{}: tensor '{name}' has unsupported type {other:?}", path.display()),
        };
        dict.insert(name, Entry { shape: view.shape().to_vec(), data });
    }
    Ok((dict, header.metadata().clone().unwrap_or_default()))
}

/// Checks a loaded dict against the expected names and shapes, listing every missing, extra and
/// mis-shaped tensor.
pub fn check_against(path: &Path, dict: &StateDict, expected: &[(String, Vec<usize>)]) -> Result<()> {
    let want: BTreeMap<&str, &[usize]> = expected.iter().map(|(k, s)| (k.as_str(), s.as_slice())).collect();
    let missing: Vec<&str> = want.keys().filter(|k| !dict.contains_key(**k)).copied().collect();
    let extra: Vec<&str> = dict.keys().map(|k| k.as_str()).filter(|k| !want.contains_key(k)).collect();
    let misshaped: Vec<String> = dict
        .iter()
        .filter_map(|(k, e)| {
            let w = want.get(k.as_str())?;
            (e.shape.as_slice() != *w).then(|| format!("{k}: file has {:?}, model expects {w:?}", e.shape))
        })
        .collect();
    if missing.is_empty() && extra.is_empty() && misshaped.is_empty() {
        return Ok(());
    }
    let mut msg = format!("{} does not match the model:", path.display());
    let list = |title: &str, items: &[String], msg: &mut String| {
        if !items.is_empty() {
            let shown: Vec<&str> = items.iter().take(20).map(|s| s.as_str()).collect();
            msg.push_str(&format!("\n  {title} ({}): {}", items.len(), shown.join(", ")));
            if items.len() > 20 {
                msg.push_str(", ...");
            }
        }
    };
    list("missing", &missing.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &mut msg);
    list("unexpected", &extra.iter().map(|s| s.to_string()).collect::<Vec<_>>(), &mut msg);
    list("wrong shape", &misshaped, &mut msg);
    bail!(msg)
}
