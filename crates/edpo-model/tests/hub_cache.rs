//! Models named `hf:ORG/NAME[@REV]` resolve offline in a Hugging Face hub cache laid out as
//! `huggingface_hub` lays it out (`models--ORG--NAME/refs/REV` holding a commit,
//! `snapshots/<commit>/…`), found through `HF_HUB_CACHE` or `HF_HOME`; a miss names what was
//! looked for and how to fetch it. Sharded checkpoints with their index, stored as links into
//! `blobs/` as the hub stores them, load like single files. One test: it sets process-wide environment variables.

use candle_core::Device;
use edpo_model::{sequence_logps, CausalLm, SequenceBatch};
use std::path::{Path, PathBuf};

type TestResult = Result<(), Box<dyn std::error::Error>>;

const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

fn golden() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../testdata/golden/llama/policy")
}

fn logps(model: &CausalLm) -> Result<Vec<f32>, Box<dyn std::error::Error>> {
    let seqs: [(&[u32], &[u32]); 2] = [(&[1, 2, 3], &[4, 5]), (&[7, 8], &[9, 10, 11])];
    Ok(sequence_logps(model, &SequenceBatch::new(&seqs, 0)?)?.to_vec1::<f32>()?)
}

/// A cache at `root` holding the golden Llama as `tiny/llama` at `COMMIT`, `main` pointing to it.
fn make_cache(root: &Path) -> std::io::Result<()> {
    let repo = root.join("models--tiny--llama");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), COMMIT)?;
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(golden().join(f), snapshot.join(f))?;
    }
    Ok(())
}

/// The golden Llama as `tiny/sharded` in the cache, the way the hub stores a large checkpoint:
/// two shards and their index, each file a symbolic link from the snapshot into `blobs/`.
fn make_sharded(root: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let repo = root.join("models--tiny--sharded");
    let snapshot = repo.join("snapshots").join(COMMIT);
    std::fs::create_dir_all(&snapshot)?;
    std::fs::create_dir_all(repo.join("blobs"))?;
    std::fs::create_dir_all(repo.join("refs"))?;
    std::fs::write(repo.join("refs/main"), COMMIT)?;
    let bytes = std::fs::read(golden().join("model.safetensors"))?;
    let all = safetensors::SafeTensors::deserialize(&bytes)?;
    let mut names: Vec<String> = all.names().into_iter().map(str::to_string).collect();
    names.sort();
    let half = names.len() / 2;
    let mut weight_map = serde_json::Map::new();
    let mut blob = 0;
    let mut link = |name: &str, data: &[u8]| -> std::io::Result<()> {
        blob += 1;
        let target = repo.join("blobs").join(format!("{blob:040x}"));
        std::fs::write(&target, data)?;
        std::os::unix::fs::symlink(&target, snapshot.join(name))
    };
    for (i, part) in [&names[..half], &names[half..]].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = part
            .iter()
            .map(|n| Ok((n.clone(), all.tensor(n)?)))
            .collect::<Result<_, safetensors::SafeTensorError>>()?;
        link(&file, &safetensors::serialize(views, None)?)?;
        for n in part.iter() {
            weight_map.insert(n.clone(), serde_json::json!(file));
        }
    }
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    link("model.safetensors.index.json", index.to_string().as_bytes())?;
    link("config.json", &std::fs::read(golden().join("config.json"))?)?;
    Ok(())
}

#[test]
fn hf_names_resolve_in_the_local_cache_and_a_miss_says_where_it_looked() -> TestResult {
    let tmp = tempfile::Builder::new().prefix("edpo-hub-").tempdir()?;
    let base = tmp.path();
    let cache = base.join("hub");
    make_cache(&cache)?;
    make_sharded(&cache)?;
    let want = logps(&CausalLm::load(&golden(), &Device::Cpu, false)?)?;

    std::env::set_var("HF_HUB_CACHE", &cache);
    for name in ["hf:tiny/llama", "hf:tiny/llama@main"] {
        let model = CausalLm::load(Path::new(name), &Device::Cpu, false)?;
        assert_eq!(logps(&model)?, want, "{name}");
        assert!(model
            .source_dir()
            .is_some_and(|d| d.ends_with(format!("snapshots/{COMMIT}"))));
    }
    let sharded = CausalLm::load(Path::new("hf:tiny/sharded"), &Device::Cpu, false)?;
    assert_eq!(
        logps(&sharded)?,
        want,
        "two shards and an index, linked into blobs/"
    );
    let by_commit = format!("hf:tiny/llama@{COMMIT}");
    assert_eq!(
        logps(&CausalLm::load(Path::new(&by_commit), &Device::Cpu, false)?)?,
        want
    );
    for (name, looked) in [
        ("hf:tiny/llama@v2", "models--tiny--llama/refs/v2"),
        ("hf:other/model", "models--other--model/refs/main"),
    ] {
        let err = CausalLm::load(Path::new(name), &Device::Cpu, false)
            .err()
            .ok_or("a missing model loaded")?
            .to_string();
        assert!(
            err.contains(looked) && err.contains("huggingface-cli download"),
            "{err}"
        );
    }

    // HF_HOME/hub when HF_HUB_CACHE is not set.
    std::env::remove_var("HF_HUB_CACHE");
    std::env::set_var("HF_HOME", base);
    assert_eq!(
        logps(&CausalLm::load(
            Path::new("hf:tiny/llama"),
            &Device::Cpu,
            false
        )?)?,
        want
    );
    std::env::remove_var("HF_HOME");
    Ok(())
}
