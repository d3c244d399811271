//! Reading tensors out of HuggingFace safetensors checkpoints.
//!
//! Files are memory-mapped and only the requested slice of a tensor is copied out, so a
//! tensor-parallel rank touches only its own pages of the checkpoint (see [`Slice`]).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::{Dtype as StDtype, Metadata};

use super::ModelError;

/// The bytes of one safetensors file: a memory map, or data embedded in the binary.
enum Bytes {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl Bytes {
    fn as_slice(&self) -> &[u8] {
        match self {
            Bytes::Mapped(m) => m,
            Bytes::Static(s) => s,
        }
    }
}

struct File {
    name: String,
    bytes: Bytes,
    /// Offset of the data section (8 + header length).
    data_start: usize,
    metadata: Metadata,
}

/// Which part of a 2-D (or 1-D) tensor to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slice {
    Full,
    /// Rows `[start, start + len)` of the first axis.
    Rows {
        start: usize,
        len: usize,
    },
    /// Columns `[start, start + len)` of the last axis of a 2-D tensor.
    Cols {
        start: usize,
        len: usize,
    },
}

/// All safetensors files of one checkpoint, indexed by tensor name.
pub struct Checkpoint {
    files: Vec<File>,
    index: HashMap<String, usize>,
    /// Stages tensors bound for a CUDA device (made at the first; its Drop waits for the
    /// last copies).
    #[cfg(feature = "cuda")]
    uploader: std::sync::Mutex<Option<super::upload::Uploader>>,
}

fn parse_file(name: String, bytes: Bytes) -> Result<File, ModelError> {
    let buf = bytes.as_slice();
    let (header_len, metadata) = safetensors::SafeTensors::read_metadata(buf).map_err(|e| ModelError::Checkpoint {
        file: name.clone(),
        tensor: None,
        message: format!("truncated or corrupt safetensors file ({e})"),
    })?;
    let data_start = 8 + header_len;
    let needed = data_start + metadata.data_len();
    if buf.len() < needed {
        return Err(ModelError::Checkpoint {
            file: name,
            tensor: None,
            message: format!("truncated: {} bytes, the header describes {needed}", buf.len()),
        });
    }
    Ok(File {
        name,
        bytes,
        data_start,
        metadata,
    })
}

fn map_file(path: &Path) -> Result<File, ModelError> {
    let name = path.display().to_string();
    let f = std::fs::File::open(path).map_err(|e| ModelError::Checkpoint {
        file: name.clone(),
        tensor: None,
        message: format!("cannot open: {e}"),
    })?;
    // SAFETY: the checkpoint is opened read-only; like every mmap-based loader we rely on
    // it not being truncated by another process while mapped.
    let mmap = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| ModelError::Checkpoint {
        file: name.clone(),
        tensor: None,
        message: format!("cannot memory-map: {e}"),
    })?;
    parse_file(name, Bytes::Mapped(mmap))
}

impl Checkpoint {
    /// Opens `model.safetensors`, or every shard listed in `model.safetensors.index.json`.
    pub fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let paths: Vec<PathBuf> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path).map_err(|e| ModelError::Checkpoint {
                file: index_path.display().to_string(),
                tensor: None,
                message: format!("cannot read: {e}"),
            })?;
            let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| ModelError::Checkpoint {
                file: index_path.display().to_string(),
                tensor: None,
                message: format!("invalid JSON: {e}"),
            })?;
            let map = v
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| ModelError::Checkpoint {
                    file: index_path.display().to_string(),
                    tensor: None,
                    message: "has no \"weight_map\" object".into(),
                })?;
            let mut names: Vec<String> = map.values().filter_map(|f| f.as_str().map(str::to_owned)).collect();
            names.sort();
            names.dedup();
            names.iter().map(|n| dir.join(n)).collect()
        } else if single.exists() {
            vec![single]
        } else {
            return Err(ModelError::Checkpoint {
                file: single.display().to_string(),
                tensor: None,
                message: "not found (nor model.safetensors.index.json)".into(),
            });
        };
        let files = paths.iter().map(|p| map_file(p)).collect::<Result<Vec<_>, _>>()?;
        Ok(Self::from_files(files))
    }

    /// A checkpoint whose single safetensors file is embedded in the binary.
    pub fn from_static(name: &str, bytes: &'static [u8]) -> Result<Self, ModelError> {
        Ok(Self::from_files(vec![parse_file(
            name.to_owned(),
            Bytes::Static(bytes),
        )?]))
    }

    fn from_files(files: Vec<File>) -> Self {
        let mut index = HashMap::new();
        for (i, f) in files.iter().enumerate() {
            for name in f.metadata.tensors().keys() {
                index.insert(name.clone(), i);
            }
        }
        Self {
            files,
            index,
            #[cfg(feature = "cuda")]
            uploader: std::sync::Mutex::new(None),
        }
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    fn file_names(&self) -> String {
        self.files
            .iter()
            .map(|f| f.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Reads `slice` of tensor `name`, checking its full shape is `expected`, into `dtype`.
    pub fn load(
        &self,
        name: &str,
        expected: &[usize],
        slice: Slice,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor, ModelError> {
        let Some(&fi) = self.index.get(name) else {
            return Err(ModelError::Checkpoint {
                file: self.file_names(),
                tensor: Some(name.to_owned()),
                message: "missing tensor".into(),
            });
        };
        let file = &self.files[fi];
        let err = |message: String| ModelError::Checkpoint {
            file: file.name.clone(),
            tensor: Some(name.to_owned()),
            message,
        };
        let info = file.metadata.info(name).ok_or_else(|| err("missing tensor".into()))?;
        if info.shape != expected {
            return Err(err(format!("shape {:?}, expected {:?}", info.shape, expected)));
        }
        let src_dtype = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            other => return Err(err(format!("dtype {other:?} is not supported (F32, F16, BF16)"))),
        };
        let elem = src_dtype.size_in_bytes();
        let (start, end) = info.data_offsets;
        let count: usize = info.shape.iter().product();
        if end < start || end - start != count * elem {
            return Err(err(format!(
                "data offsets {start}..{end} do not match shape {:?}",
                info.shape
            )));
        }
        let data = &file.bytes.as_slice()[file.data_start + start..file.data_start + end];
        let (bytes, shape): (std::borrow::Cow<[u8]>, Vec<usize>) = match slice {
            Slice::Full => (data.into(), info.shape.clone()),
            Slice::Rows { start: r0, len } => {
                let rows = *info
                    .shape
                    .first()
                    .ok_or_else(|| err("scalar cannot be sliced".into()))?;
                if r0 + len > rows {
                    return Err(err(format!("rows {r0}..{} out of {rows}", r0 + len)));
                }
                let row_bytes = count / rows.max(1) * elem;
                let mut shape = info.shape.clone();
                shape[0] = len;
                (data[r0 * row_bytes..(r0 + len) * row_bytes].into(), shape)
            }
            Slice::Cols { start: c0, len } => {
                let &[rows, cols] = info.shape.as_slice() else {
                    return Err(err("column slices need a 2-D tensor".into()));
                };
                if c0 + len > cols {
                    return Err(err(format!("columns {c0}..{} out of {cols}", c0 + len)));
                }
                if c0 == 0 && len == cols {
                    // One rank's "slice" is the whole tensor: no copy (a single-threaded one
                    // was 12 of the 20B model's 15 s load on an H100).
                    (data.into(), info.shape.clone())
                } else {
                    let row_bytes = len * elem;
                    let mut out = vec![0u8; rows * row_bytes];
                    out.par_chunks_mut(row_bytes.max(1)).enumerate().for_each(|(r, dst)| {
                        let base = (r * cols + c0) * elem;
                        dst.copy_from_slice(&data[base..base + row_bytes]);
                    });
                    (out.into(), vec![rows, len])
                }
            }
        };
        let t = self
            .to_device(&bytes, src_dtype, &shape, device)
            .map_err(|e| err(e.to_string()))?;
        t.to_dtype(dtype).map_err(|e| err(e.to_string()))
    }

    fn to_device(&self, bytes: &[u8], dtype: DType, shape: &[usize], device: &Device) -> Result<Tensor, ModelError> {
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = device {
            let mut uploader = self
                .uploader
                .lock()
                .map_err(|_| ModelError::Internal("a weight upload panicked".into()))?;
            let u = match uploader.as_mut() {
                Some(u) => u,
                None => uploader.insert(super::upload::Uploader::new(dev)?),
            };
            return u.upload(bytes, dtype, shape);
        }
        Ok(Tensor::from_raw_buffer(bytes, dtype, shape, device)?)
    }
}
