//! LoRA adapters (Hu et al., 2021) as PEFT defines and stores them.
//!
//! [`CausalLm::with_lora`] gives a model whose targeted linear modules (by the last component
//! of their name: `q_proj`, `v_proj`, `c_attn`, …) carry adapters `A (r, in)` and
//! `B (out, r)` adding `scale·(x·Aᵀ)·Bᵀ`, `scale = alpha/r` (`alpha/√r` with rsLoRA). Only
//! the adapters are trainable; the base tensors are the same tensors as the model it was made
//! from, so that model, with no adapters, is the reference, and a LoRA run holds one copy of
//! the base weights. Fresh adapters start as PEFT's do (`A` uniform in ±1/√in, `B` zero: the
//! adapted model equals the base).
//!
//! [`CausalLm::save_adapter`] writes `adapter_model.safetensors` (names
//! `base_model.model.<module>.lora_A.weight`) and `adapter_config.json`, which PEFT loads;
//! [`CausalLm::load_adapter`] reads them back onto a base model.

use crate::arch::{self, Weights};
use crate::checkpoint::{self, read_file};
use crate::model::{CausalLm, Param};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;

pub use crate::nn::LoraConfig;

/// PEFT's prefix of adapter tensor names in `adapter_model.safetensors`.
const PREFIX: &str = "base_model.model.";
/// The adapter's files.
const WEIGHTS_FILE: &str = "adapter_model.safetensors";
const CONFIG_FILE: &str = "adapter_config.json";

impl CausalLm {
    /// The targeted modules: `(module name, in, out)` for every 2-d weight of a targeted
    /// linear module, in parameter order; an error if a target matches nothing.
    fn lora_modules(&self, cfg: &LoraConfig) -> Result<Vec<(String, usize, usize)>> {
        let input_major = matches!(self.config, crate::ModelConfig::Gpt2(_));
        let mut out = Vec::new();
        for p in &self.params {
            let Some(module) = p.name.strip_suffix(".weight") else {
                continue;
            };
            let last = module.rsplit('.').next().unwrap_or(module);
            let dims = p.tensor.dims();
            if dims.len() != 2 || !cfg.targets.iter().any(|t| t == last) {
                continue;
            }
            let (inp, outp) = if input_major {
                (dims[0], dims[1])
            } else {
                (dims[1], dims[0])
            };
            out.push((module.to_string(), inp, outp));
        }
        for t in &cfg.targets {
            if !out
                .iter()
                .any(|(m, _, _)| m.rsplit('.').next() == Some(t.as_str()))
            {
                return Err(Error::Input(format!(
                    "LoRA target `{t}` matches no linear module of this model"
                )));
            }
        }
        if cfg.r == 0 {
            return Err(Error::Input("LoRA rank r must be at least 1".into()));
        }
        Ok(out)
    }

    /// This model with fresh adapters on `cfg`'s targets (seeded), only they trainable.
    pub fn with_lora(&self, cfg: &LoraConfig, seed: u64) -> Result<Self> {
        let mut rng = edpo_data::rng::SplitMix64(seed);
        let mut adapters = HashMap::new();
        for (module, inp, outp) in self.lora_modules(cfg)? {
            let bound = 1.0 / (inp as f64).sqrt();
            let a: Vec<f32> = (0..cfg.r * inp)
                .map(|_| ((2.0 * rng.uniform() - 1.0) * bound) as f32)
                .collect();
            adapters.insert(
                format!("{module}.lora_A.weight"),
                Tensor::from_vec(a, (cfg.r, inp), &self.device)?,
            );
            adapters.insert(
                format!("{module}.lora_B.weight"),
                Tensor::zeros((outp, cfg.r), candle_core::DType::F32, &self.device)?,
            );
        }
        self.adapted(cfg, adapters)
    }

    /// This model with the adapters of a PEFT adapter directory (`adapter_config.json`,
    /// `adapter_model.safetensors`), only they trainable.
    pub fn load_adapter(&self, dir: &Path) -> Result<Self> {
        let config_path = dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&config_path).map_err(|source| Error::Io {
            path: config_path.clone(),
            source,
        })?;
        let raw: serde_json::Value = serde_json::from_str(&text).map_err(|source| Error::Json {
            path: config_path.clone(),
            source,
        })?;
        let bad = |key: &str, message: &str| Error::BadKey {
            path: config_path.clone(),
            key: key.into(),
            message: message.into(),
        };
        if raw["peft_type"] != "LORA" {
            return Err(bad("peft_type", "only LORA adapters are supported"));
        }
        let targets = match &raw["target_modules"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("target_modules", "expected module names"))?,
            serde_json::Value::String(s) => vec![s.clone()],
            _ => return Err(bad("target_modules", "missing or not a list of names")),
        };
        let cfg = LoraConfig {
            r: raw["r"]
                .as_u64()
                .ok_or_else(|| bad("r", "missing or not an integer"))? as usize,
            alpha: raw["lora_alpha"]
                .as_f64()
                .ok_or_else(|| bad("lora_alpha", "missing or not a number"))?,
            targets,
            rslora: raw["use_rslora"].as_bool().unwrap_or(false),
        };
        let mut read = HashMap::new();
        read_file(&dir.join(WEIGHTS_FILE), &self.device, &mut read)?;
        let adapters = read
            .into_iter()
            .map(|(name, (t, _))| (name.strip_prefix(PREFIX).unwrap_or(&name).to_string(), t))
            .collect();
        self.adapted(&cfg, adapters)
    }

    /// The base tensors shared with `self` and frozen, the adapters trainable, every adapter
    /// present with its shape.
    fn adapted(&self, cfg: &LoraConfig, mut adapters: HashMap<String, Tensor>) -> Result<Self> {
        let mut tensors: HashMap<String, Tensor> = HashMap::new();
        let mut params: Vec<Param> = self
            .params
            .iter()
            .map(|p| {
                tensors.insert(p.name.clone(), p.tensor.clone());
                Param {
                    name: p.name.clone(),
                    tensor: p.tensor.clone(),
                    var: None,
                    decay: p.decay,
                }
            })
            .collect();
        for (module, inp, outp) in self.lora_modules(cfg)? {
            for (part, shape) in [("lora_A", [cfg.r, inp]), ("lora_B", [outp, cfg.r])] {
                let name = format!("{module}.{part}.weight");
                let t = adapters.remove(&name).ok_or_else(|| Error::MissingTensor {
                    path: WEIGHTS_FILE.into(),
                    name: format!("{PREFIX}{name}"),
                })?;
                if t.dims() != shape {
                    return Err(Error::TensorShape {
                        path: WEIGHTS_FILE.into(),
                        name: format!("{PREFIX}{name}"),
                        found: t.dims().to_vec(),
                        expected: shape.to_vec(),
                    });
                }
                let var = Var::from_tensor(&t.to_dtype(candle_core::DType::F32)?)?;
                tensors.insert(name.clone(), var.as_tensor().clone());
                params.push(Param {
                    name,
                    tensor: var.as_tensor().clone(),
                    var: Some(var),
                    decay: true,
                });
            }
        }
        if let Some(extra) = adapters.keys().next() {
            return Err(Error::Input(format!(
                "adapter tensor `{PREFIX}{extra}` is not on a target module of this model"
            )));
        }
        let arch = arch::of(&self.config).build(&Weights {
            tensors,
            lora_scale: cfg.scale(),
            frozen: true,
        });
        Ok(Self {
            config: self.config.clone(),
            raw_config: self.raw_config.clone(),
            arch,
            params,
            device: self.device.clone(),
            source_dir: self.source_dir.clone(),
            made_files: self.made_files.clone(),
            lora: Some(cfg.clone()),
            forward_count: Default::default(),
        })
    }

    /// The adapters' configuration, if the model carries adapters.
    pub fn lora(&self) -> Option<&LoraConfig> {
        self.lora.as_ref()
    }

    /// Writes the adapters as a PEFT adapter directory; an error for a model without adapters.
    pub fn save_adapter(&self, dir: &Path) -> Result<()> {
        let cfg = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::Input("the model has no LoRA adapters to save".into()))?;
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let tensors: Vec<(String, Tensor)> = self
            .params
            .iter()
            .filter(|p| p.name.contains(".lora_A.") || p.name.contains(".lora_B."))
            .map(|p| (format!("{PREFIX}{}", p.name), p.tensor.clone()))
            .collect();
        checkpoint::write_safetensors_file(&dir.join(WEIGHTS_FILE), &tensors)?;
        let config = json!({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": cfg.r, "lora_alpha": cfg.alpha,
            "target_modules": cfg.targets, "lora_dropout": 0.0, "bias": "none",
            "use_rslora": cfg.rslora, "fan_in_fan_out": matches!(self.config, crate::ModelConfig::Gpt2(_)),
            "inference_mode": true, "base_model_name_or_path": self.source_dir.as_ref().map(|d| d.display().to_string()),
        });
        let text = serde_json::to_string_pretty(&config).map_err(|source| Error::Json {
            path: dir.join(CONFIG_FILE),
            source,
        })?;
        checkpoint::write_atomic(&dir.join(CONFIG_FILE), text.as_bytes())
    }

    /// The adapters merged into the base: every targeted weight becomes
    /// `W + scale·B·A` (transposed for GPT-2's input-major weights), as PEFT's
    /// `merge_and_unload` gives, in a plain frozen model that saves as a full Hugging Face
    /// directory; an error for a model without adapters.
    pub fn merged(&self) -> Result<Self> {
        let cfg = self
            .lora
            .as_ref()
            .ok_or_else(|| Error::Input("the model has no LoRA adapters to merge".into()))?;
        let input_major = matches!(self.config, crate::ModelConfig::Gpt2(_));
        let by_name: HashMap<&str, &Tensor> = self
            .params
            .iter()
            .map(|p| (p.name.as_str(), &p.tensor))
            .collect();
        let mut tensors = HashMap::new();
        for p in &self.params {
            if p.name.contains(".lora_A.") || p.name.contains(".lora_B.") {
                continue;
            }
            let module = p.name.strip_suffix(".weight").unwrap_or(&p.name);
            let a = by_name.get(format!("{module}.lora_A.weight").as_str());
            let b = by_name.get(format!("{module}.lora_B.weight").as_str());
            let tensor = match (a, b) {
                (Some(a), Some(b)) => {
                    let delta = (b.matmul(a)? * cfg.scale())?;
                    let delta = if input_major { delta.t()? } else { delta };
                    (&p.tensor + delta.to_dtype(p.tensor.dtype())?)?
                }
                _ => p.tensor.clone(),
            };
            tensors.insert(p.name.clone(), tensor);
        }
        let mut ckpt = checkpoint::Checkpoint::from_tensors(tensors, "merged adapters".into());
        let mut model = Self::from_checkpoint_with(
            self.config.clone(),
            self.raw_config.clone(),
            &mut ckpt,
            &self.device,
            &|_| false,
        )?;
        model.source_dir = self.source_dir.clone();
        model.made_files = self.made_files.clone();
        Ok(model)
    }
}
