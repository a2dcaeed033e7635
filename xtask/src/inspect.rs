//! `cargo xtask inspect FILE`: the metadata and the tensor table (name, dtype, shape) of a GGUF
//! file, a `.safetensors` file, or every shard of a Hugging Face directory. Reads headers only
//! (GGUF is memory-mapped; safetensors headers are read without touching the data). Long metadata
//! arrays (vocabularies, merges) are summarised, not dumped.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::quantized::gguf_file::Value;
use clap::Args;

/// `writeln!` into a String (cannot fail).
macro_rules! outln {
    ($o:expr, $($arg:tt)*) => {
        let _ = writeln!($o, $($arg)*);
    };
}

/// Flags of `cargo xtask inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    /// A GGUF file, a .safetensors file or a directory of them.
    file: PathBuf,
}

/// Runs `cargo xtask inspect`.
pub fn run(args: &InspectArgs) -> anyhow::Result<()> {
    let path = &args.file;
    if path.is_dir() {
        let mut shards: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("cannot read {}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.extension()
                    .is_some_and(|x| x == "safetensors" || x == "gguf")
            })
            .collect();
        shards.sort();
        if shards.is_empty() {
            bail!("{}: no .safetensors or .gguf files", path.display());
        }
        for s in shards {
            inspect_file(&s)?;
        }
        return Ok(());
    }
    inspect_file(path)
}

fn inspect_file(path: &Path) -> anyhow::Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .with_context(|| format!("cannot read {}", path.display()))?;
    let mut o = String::new();
    if &magic == b"GGUF" {
        inspect_gguf(path, &mut o)?;
    } else {
        inspect_safetensors(path, &mut o)?;
    }
    // A closed pipe (`| head`) is not an error.
    match std::io::stdout().lock().write_all(o.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            Err(e).context("cannot write to stdout")
        }
        _ => Ok(()),
    }
}

fn inspect_gguf(path: &Path, o: &mut String) -> anyhow::Result<()> {
    let file = model_zoo::GgufFile::open(path)?;
    let content = file.content();
    outln!(o, "# {} (GGUF)", path.display());
    outln!(o, "## metadata ({} keys)", content.metadata.len());
    let mut keys: Vec<&String> = content.metadata.keys().collect();
    keys.sort();
    for k in keys {
        outln!(o, "{k} = {}", show_value(&content.metadata[k]));
    }
    let mut tensors: Vec<_> = content.tensor_infos.iter().collect();
    tensors.sort_by_key(|(_, info)| info.offset);
    outln!(o, "## tensors ({})", tensors.len());
    outln!(o, "{:<40} {:<6} shape", "name", "dtype");
    for (name, info) in tensors {
        outln!(
            o,
            "{name:<40} {:<6} {:?}",
            format!("{:?}", info.ggml_dtype),
            info.shape.dims()
        );
    }
    Ok(())
}

fn inspect_safetensors(path: &Path, o: &mut String) -> anyhow::Result<()> {
    let header = model_zoo::convert::read_safetensors_header(path)?;
    let obj = header
        .as_object()
        .with_context(|| format!("{}: header is not a JSON object", path.display()))?;
    outln!(o, "# {} (safetensors)", path.display());
    let metadata = obj.get("__metadata__").and_then(|m| m.as_object());
    outln!(o, "## metadata ({} keys)", metadata.map_or(0, |m| m.len()));
    if let Some(m) = metadata {
        for (k, v) in m {
            outln!(
                o,
                "{k} = {}",
                clip(&v.as_str().map_or(v.to_string(), str::to_string))
            );
        }
    }
    let mut tensors: Vec<(&String, &serde_json::Value)> =
        obj.iter().filter(|(k, _)| *k != "__metadata__").collect();
    tensors.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap_or(0));
    outln!(o, "## tensors ({})", tensors.len());
    outln!(o, "{:<50} {:<6} shape", "name", "dtype");
    for (name, v) in tensors {
        outln!(
            o,
            "{name:<50} {:<6} {}",
            v["dtype"].as_str().unwrap_or("?"),
            v["shape"]
        );
    }
    Ok(())
}

/// One metadata value on one line; arrays show their length and first items.
fn show_value(v: &Value) -> String {
    match v {
        Value::Array(items) => {
            let head: Vec<String> = items.iter().take(4).map(show_value).collect();
            let more = if items.len() > 4 { ", …" } else { "" };
            format!("[{} items: {}{more}]", items.len(), head.join(", "))
        }
        Value::String(s) => clip(&format!("{s:?}")),
        Value::U8(x) => x.to_string(),
        Value::I8(x) => x.to_string(),
        Value::U16(x) => x.to_string(),
        Value::I16(x) => x.to_string(),
        Value::U32(x) => x.to_string(),
        Value::I32(x) => x.to_string(),
        Value::U64(x) => x.to_string(),
        Value::I64(x) => x.to_string(),
        Value::F32(x) => x.to_string(),
        Value::F64(x) => x.to_string(),
        Value::Bool(x) => x.to_string(),
    }
}

/// Cuts long text (chat templates) to one readable line.
fn clip(s: &str) -> String {
    const MAX: usize = 120;
    let one_line = s.replace('\n', "\\n");
    match one_line.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}… ({} chars)", &one_line[..i], s.chars().count()),
        None => one_line,
    }
}
