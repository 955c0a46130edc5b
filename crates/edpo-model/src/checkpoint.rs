//! Safetensors checkpoints in the Hugging Face layout: `model.safetensors`, or shards
//! `model-0000x-of-0000y.safetensors` listed in `model.safetensors.index.json`.
//!
//! Reading converts every floating-point tensor to f32 and remembers which file each came
//! from, so a missing or misshapen tensor is reported with its file. Writing produces one
//! `model.safetensors` with `{"format": "pt"}` metadata, which `transformers` requires, through
//! a temporary file and a rename so that a crash never leaves a half-written checkpoint.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// Name of the single-file checkpoint.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Name of the shard index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Tensors read from a checkpoint directory, by Hugging Face name.
#[derive(Debug)]
pub struct Checkpoint {
    tensors: HashMap<String, (Tensor, PathBuf)>,
    /// What to name in an error about a tensor that is absent.
    origin: PathBuf,
}

impl Checkpoint {
    /// Reads `model.safetensors`, or the shards its index lists, from `dir`.
    pub fn read_dir(dir: &Path, device: &Device) -> Result<Self> {
        let single = dir.join(SINGLE_FILE);
        let index = dir.join(INDEX_FILE);
        let mut tensors = HashMap::new();
        if single.exists() {
            read_file(&single, device, &mut tensors)?;
            return Ok(Self {
                tensors,
                origin: single,
            });
        }
        if !index.exists() {
            return Err(Error::Io {
                path: single,
                source: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("no checkpoint: neither {SINGLE_FILE} nor {INDEX_FILE} exists"),
                ),
            });
        }
        let text = std::fs::read_to_string(&index).map_err(|source| Error::Io {
            path: index.clone(),
            source,
        })?;
        let parsed: serde_json::Value =
            serde_json::from_str(&text).map_err(|source| Error::Json {
                path: index.clone(),
                source,
            })?;
        let map = parsed
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| Error::BadKey {
                path: index.clone(),
                key: "weight_map".into(),
                message: "missing or not an object".into(),
            })?;
        let mut shards: Vec<&str> = Vec::new();
        for (name, file) in map {
            let file = file.as_str().ok_or_else(|| Error::BadKey {
                path: index.clone(),
                key: format!("weight_map.{name}"),
                message: "expected a file name".into(),
            })?;
            if !shards.contains(&file) {
                shards.push(file);
            }
        }
        shards.sort_unstable();
        for shard in shards {
            read_file(&dir.join(shard), device, &mut tensors)?;
        }
        Ok(Self {
            tensors,
            origin: index,
        })
    }

    /// Builds a checkpoint from tensors already in memory (used by tests and conversions).
    pub fn from_tensors(tensors: HashMap<String, Tensor>, origin: PathBuf) -> Self {
        let tensors = tensors
            .into_iter()
            .map(|(k, v)| (k, (v, origin.clone())))
            .collect();
        Self { tensors, origin }
    }

    /// Whether a tensor of this name is present.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// Takes the tensor `name`, checking its shape.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (tensor, path) = self
            .tensors
            .remove(name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.clone(),
                name: name.into(),
            })?;
        if tensor.dims() != shape {
            return Err(Error::TensorShape {
                path,
                name: name.into(),
                found: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        Ok(tensor)
    }

    /// Takes the tensor `name` whatever its shape.
    pub fn take_any(&mut self, name: &str) -> Result<Tensor> {
        self.tensors
            .remove(name)
            .map(|(t, _)| t)
            .ok_or_else(|| Error::MissingTensor {
                path: self.origin.clone(),
                name: name.into(),
            })
    }

    /// Names left after the model took what it needs (buffers such as GPT-2's `attn.bias`).
    pub fn remaining(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }
}

/// Reads every tensor of one safetensors file into `out` (as f32), remembering the file.
pub(crate) fn read_file(
    path: &Path,
    device: &Device,
    out: &mut HashMap<String, (Tensor, PathBuf)>,
) -> Result<()> {
    let bytes = std::fs::read(path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::Checkpoint {
        path: path.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    for (name, view) in st.tensors() {
        let dtype = match view.dtype() {
            Dtype::F32 => DType::F32,
            Dtype::F16 => DType::F16,
            Dtype::BF16 => DType::BF16,
            Dtype::F64 => DType::F64,
            // Integer buffers (e.g. old GPT-2 causal-mask buffers) are not parameters.
            Dtype::BOOL | Dtype::U8 | Dtype::I8 | Dtype::I16 | Dtype::I32 | Dtype::I64 => continue,
            other => {
                return Err(Error::Checkpoint {
                    path: path.to_path_buf(),
                    message: format!("tensor `{name}` has unsupported dtype {other:?}"),
                })
            }
        };
        let tensor = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), device)?
            .to_dtype(DType::F32)?;
        out.insert(name, (tensor, path.to_path_buf()));
    }
    Ok(())
}

/// Writes `tensors` (f32) as `dir/model.safetensors`, atomically.
pub fn write_safetensors(dir: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    write_safetensors_file(&dir.join(SINGLE_FILE), tensors)
}

/// Writes `tensors` as one safetensors file at `target` (f32, `{"format": "pt"}` metadata).
pub fn write_safetensors_file(target: &Path, tensors: &[(String, Tensor)]) -> Result<()> {
    let mut buffers: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (name, t) in tensors {
        let values = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        buffers.push((name.clone(), t.dims().to_vec(), bytes));
    }
    let mut views = Vec::with_capacity(buffers.len());
    for (name, shape, bytes) in &buffers {
        let view = safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).map_err(
            |e| Error::Checkpoint {
                path: target.to_path_buf(),
                message: format!("tensor `{name}`: {e}"),
            },
        )?;
        views.push((name.as_str(), view));
    }
    let metadata: HashMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| Error::Checkpoint {
        path: target.to_path_buf(),
        message: format!("cannot serialise: {e}"),
    })?;
    write_atomic(target, &bytes)
}

/// Writes a file through a temporary sibling and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp{}",
        path.extension().and_then(|e| e.to_str()).unwrap_or(""),
        std::process::id()
    ));
    std::fs::write(&tmp, bytes).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    std::fs::rename(&tmp, path).map_err(|source| Error::Io {
        path: path.to_path_buf(),
        source,
    })
}
