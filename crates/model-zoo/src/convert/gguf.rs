//! GGUF → Hugging Face: which GGUF tensors become which HF tensors, undoing llama.cpp's q/k row
//! permutation for Llama and Mistral (`[n_head, out/n_head/2, 2, in]` → swap axes 1, 2, so the
//! result runs with the half-split RoPE layout of Hugging Face; Qwen2 GGUFs are not permuted),
//! and the config and tokenizer files written beside the weights.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Tensor};

use super::{
    add_gates, dtype_torch_name, write_json, write_shards, ConvertOptions, ConvertSummary,
    FileSink, Origin, Progress, Shard,
};
use crate::config::{Architecture, ModelConfig};
use crate::error::{ModelError, Result};
use crate::tokenizer::Tokenizer;
use crate::weights::{GgufFile, Naming, TensorRole};

/// The GGUF tensor names a Llama-family model of `cfg` holds, each with its Hugging Face name
/// and, for Llama/Mistral q/k (permuted by llama.cpp's converter), the heads to un-permute for.
fn gguf_to_hf_names(cfg: &ModelConfig) -> BTreeMap<String, (String, Option<usize>)> {
    let permuted = matches!(
        cfg.architecture,
        Architecture::Llama | Architecture::Mistral
    );
    let global = [
        TensorRole::Embedding,
        TensorRole::OutputNorm,
        TensorRole::LmHead,
    ];
    let per_layer = [
        TensorRole::AttnNorm,
        TensorRole::Q,
        TensorRole::K,
        TensorRole::V,
        TensorRole::O,
        TensorRole::FfnNorm,
        TensorRole::Gate,
        TensorRole::Up,
        TensorRole::Down,
    ];
    let roles = global
        .iter()
        .map(|r| (*r, 0))
        .chain((0..cfg.n_layers).flat_map(|l| per_layer.iter().map(move |r| (*r, l))));
    let mut names = BTreeMap::new();
    for (role, layer) in roles {
        let heads = match role {
            TensorRole::Q if permuted => Some(cfg.n_heads),
            TensorRole::K if permuted => Some(cfg.n_kv_heads),
            _ => None,
        };
        names.insert(
            role.name(Naming::Gguf, layer),
            (role.name(Naming::HuggingFace, layer), heads),
        );
        names.insert(
            role.bias_name(Naming::Gguf, layer),
            (role.bias_name(Naming::HuggingFace, layer), heads),
        );
    }
    names
}

/// Converts the opened GGUF `file` into the files of a Hugging Face directory, written into
/// `out` (`opts.dtype` is one [`super::check_output_dtype`] accepts).
pub(super) fn gguf_to_hf(
    file: GgufFile,
    out: &mut dyn FileSink,
    opts: &ConvertOptions,
    progress: &mut Progress<'_>,
) -> Result<ConvertSummary> {
    let src = file.path();
    let cfg = ModelConfig::from_gguf(src, file.content())?;
    let tokenizer = Tokenizer::from_gguf(src, file.content())?;
    let names = gguf_to_hf_names(&cfg);
    let metadata = BTreeMap::from([("format".to_string(), "pt".to_string())]);
    let mut shard = Shard::new("model.safetensors".into(), metadata);
    let infos = &file.content().tensor_infos;
    let (mut planned, mut skipped) = (Vec::new(), Vec::new());
    for gguf_name in infos.keys() {
        match names.get(gguf_name) {
            Some((hf, heads)) => planned.push((hf, gguf_name, *heads)),
            None => skipped.push(gguf_name.clone()),
        }
    }
    // In the order of the output names, as the cast writes them: the tensor table is a hash
    // map, whose order would make every conversion a different file.
    planned.sort();
    skipped.sort();
    for (hf, gguf_name, heads) in planned {
        let shape = infos[gguf_name].shape.dims().to_vec();
        if let Some(h) = heads {
            check_unpermutable(src, gguf_name, &shape, h)?;
        }
        let origin = Origin::Gguf {
            name: gguf_name.clone(),
            unpermute_heads: heads,
        };
        shard.push(hf.clone(), opts.dtype, shape, origin);
    }
    let gate_tensors = add_gates(opts, &mut shard)?;
    let shards = [shard];
    let (mut files, bytes) = write_shards(out, &shards, Some(&file), progress)?;
    files.extend(write_hf_side_files(out, src, &cfg, &tokenizer, opts.dtype)?);
    files.sort();
    Ok(ConvertSummary {
        files,
        tensors: shards[0].plan.len(),
        tensor_bytes: bytes,
        skipped,
        gate_tensors,
    })
}

/// Writes `config.json`, `tokenizer.json` and `tokenizer_config.json` (with the chat template)
/// of the GGUF `src` converted to `dtype`; returns their names.
fn write_hf_side_files(
    out: &mut dyn FileSink,
    src: &Path,
    cfg: &ModelConfig,
    tokenizer: &Tokenizer,
    dtype: DType,
) -> Result<[String; 3]> {
    let mut hf_config = cfg.to_hf_value(tokenizer.bos_id(), tokenizer.eos_ids());
    hf_config["torch_dtype"] = dtype_torch_name(dtype).into();
    write_json(out, "config.json", &hf_config)?;
    let tok_json = tokenizer.inner().to_string(false).map_err(|e| {
        ModelError::tokenizer_failed(&src.display().to_string(), "cannot serialise: ", e)
    })?;
    out.file("tokenizer.json", &mut |w| {
        Ok(w.write_all(tok_json.as_bytes())?)
    })?;
    let token_text = |id: Option<u32>| id.and_then(|i| tokenizer.inner().id_to_token(i));
    let tok_config = serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token_text(tokenizer.bos_id()),
        "eos_token": token_text(tokenizer.eos_ids().first().copied()),
        "add_bos_token": tokenizer.adds_bos(),
        "add_eos_token": false,
        "model_max_length": cfg.max_position,
        "chat_template": tokenizer.chat_template(),
    });
    write_json(out, "tokenizer_config.json", &tok_config)?;
    Ok(["config.json", "tokenizer.json", "tokenizer_config.json"].map(String::from))
}

fn check_unpermutable(src: &Path, name: &str, shape: &[usize], heads: usize) -> Result<()> {
    let rows = shape.first().copied().unwrap_or(0);
    if heads == 0 || rows % (2 * heads) != 0 {
        return Err(ModelError::Input(format!(
            "{}: tensor `{name}` has {rows} rows, not a multiple of 2 × {heads} heads: cannot undo llama.cpp's q/k permutation",
            src.display()
        )));
    }
    Ok(())
}

/// Undoes llama.cpp's q/k row permutation: rows `[n_head, 2, half, …]` (GGUF) become
/// `[n_head, half, 2, …]` swapped back, i.e. HF = reshape `[n_head, half, 2, in]` → swap axes
/// 1 and 2 → `[out, in]`. Works for weights `[out, in]` and biases `[out]`.
pub fn unpermute_rows(t: &Tensor, n_head: usize) -> Result<Tensor> {
    let dims = t.dims().to_vec();
    let out = dims.first().copied().unwrap_or(0);
    let inner: usize = dims.iter().skip(1).product();
    if n_head == 0 || out % (2 * n_head) != 0 {
        return Err(ModelError::Input(format!(
            "cannot un-permute {out} rows for {n_head} heads (rows must be a multiple of 2 × heads)"
        )));
    }
    let half = out / n_head / 2;
    Ok(t.reshape((n_head, half, 2, inner))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape(dims)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// The inverse of llama.cpp's permute (`reshape(n_head, 2, half, in).swapaxes(1, 2)`).
    fn permute(t: &Tensor, n_head: usize) -> Tensor {
        let dims = t.dims().to_vec();
        let half = dims[0] / n_head / 2;
        t.reshape((n_head, 2, half, dims[1]))
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap()
            .reshape(dims)
            .unwrap()
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let data: Vec<f32> = (0..24 * 3).map(|i| i as f32).collect();
        let hf = Tensor::from_vec(data, (24, 3), &Device::Cpu).unwrap();
        let gguf = permute(&hf, 3);
        assert_ne!(gguf.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        let back = unpermute_rows(&gguf, 3).unwrap();
        assert_eq!(back.to_vec2::<f32>().unwrap(), hf.to_vec2::<f32>().unwrap());
        assert!(unpermute_rows(&hf, 5).is_err());
    }
}
