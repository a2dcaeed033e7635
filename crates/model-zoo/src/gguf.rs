//! The structure of a GGUF file, checked as ggml's own loader (`gguf_init_from_file`) checks it,
//! before anything else reads the file: header and counts, unique metadata keys, a
//! `general.alignment` that is a `u32` power of two, unique tensor names, at most four
//! non-negative dimensions whose element and byte counts do not overflow, a known tensor type
//! whose rows hold whole blocks, and tensor data laid out as ggml lays it out — in header order,
//! each tensor at the running offset padded to the alignment (so every offset is aligned and no
//! two tensors overlap) — and wholly inside the file.
//!
//! Invariant: [`check`] reads only the bytes it is given, never panics or allocates more than
//! the header it walks, and names the tensor, key and value at fault.

use candle_core::quantized::GgmlDType;

/// The alignment of tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// Longest tensor name ggml accepts (`GGML_MAX_NAME - 1`).
const MAX_NAME: usize = 63;

/// Most dimensions of a tensor (`GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;

/// Deepest nesting of metadata arrays accepted.
const MAX_DEPTH: usize = 64;

/// What [`check`] found: where the tensor data starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Byte offset of the data section in the file.
    pub data_offset: u64,
    /// The data alignment.
    pub alignment: u64,
}

/// A bounds-checked reader over the file's bytes.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
    /// GGUF v1 stores lengths and dimensions as `u32`.
    v1: bool,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &str) -> Result<&'a [u8], String> {
        let left = (self.bytes.len() - self.at) as u64;
        if n > left {
            return Err(format!(
                "truncated header: {what} needs {n} bytes at offset {} but the file has {left} left",
                self.at
            ));
        }
        let out = &self.bytes[self.at..self.at + n as usize];
        self.at += n as usize;
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, String> {
        let b = self.take(4, what)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u64(&mut self, what: &str) -> Result<u64, String> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_le_bytes(a))
    }

    /// A length or dimension: `u32` in v1, `u64` later.
    fn len(&mut self, what: &str) -> Result<u64, String> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn string(&mut self, what: &str) -> Result<String, String> {
        let n = self.len(what)?;
        let b = self.take(n, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| format!("{what} is not valid UTF-8"))
    }

    /// Skips one metadata value of type `ty`; returns it when it is a `u32` (the one type a
    /// checked key must have).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> Result<Option<u32>, String> {
        let what = || format!("the value of `{key}`");
        let fixed = match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4 => return self.u32(&what()).map(Some),
            5 | 6 => 4,
            10..=12 => 8,
            8 => {
                self.string(&what())?;
                return Ok(None);
            }
            9 => {
                if depth >= MAX_DEPTH {
                    return Err(format!("`{key}`: arrays nested deeper than {MAX_DEPTH}"));
                }
                let elem = self.u32(&what())?;
                let count = self.len(&what())?;
                for _ in 0..count {
                    self.value(elem, key, depth + 1)?;
                }
                return Ok(None);
            }
            other => return Err(format!("`{key}` has unknown value type {other}")),
        };
        self.take(fixed, &what())?;
        Ok(None)
    }
}

/// One tensor as the header describes it.
struct TensorInfo {
    name: String,
    bytes: u64,
    offset: u64,
}

/// Checks the structure of a whole GGUF file (see the module header); returns where its data
/// starts. Errors are one sentence naming the key or tensor at fault.
pub fn check(bytes: &[u8]) -> Result<Layout, String> {
    let mut c = Cursor {
        bytes,
        at: 0,
        v1: false,
    };
    let (n_tensors, n_kv) = header(&mut c)?;
    let alignment = metadata(&mut c, n_kv)?;
    let mut names = std::collections::HashSet::new();
    let mut tensors = Vec::new();
    for _ in 0..n_tensors {
        let info = tensor_info(&mut c)?;
        if !names.insert(info.name.clone()) {
            return Err(format!("tensor `{}` appears twice", info.name));
        }
        tensors.push(info);
    }
    let data_offset = (c.at as u64).div_ceil(alignment) * alignment;
    check_data_layout(&tensors, data_offset, alignment, bytes.len() as u64)?;
    Ok(Layout {
        data_offset,
        alignment,
    })
}

/// Reads and checks the magic, the version and the counts; returns (tensors, metadata
/// entries).
fn header(c: &mut Cursor<'_>) -> Result<(u64, u64), String> {
    let magic = c.take(4, "the magic number")?;
    if magic != b"GGUF" {
        return Err(format!(
            "the file starts with {magic:02x?}, not the GGUF magic \"GGUF\""
        ));
    }
    let version = c.u32("the version")?;
    if !(1..=3).contains(&version) {
        return Err(format!(
            "unsupported GGUF version {version} (expected 1 to 3)"
        ));
    }
    c.v1 = version == 1;
    let n_tensors = c.len("the tensor count")?;
    let n_kv = c.len("the metadata count")?;
    // The smallest possible entries must fit in the file: bounds the loops that follow.
    let left = (c.bytes.len() - c.at) as u64;
    if n_kv
        .saturating_mul(13)
        .saturating_add(n_tensors.saturating_mul(24))
        > left
    {
        return Err(format!(
            "the header declares {n_tensors} tensors and {n_kv} metadata entries, more than its {left} bytes can hold"
        ));
    }
    Ok((n_tensors, n_kv))
}

/// Walks the `n_kv` metadata entries (unique keys); returns the data alignment
/// (`general.alignment`, a `u32` power of two, or [`DEFAULT_ALIGNMENT`]).
fn metadata(c: &mut Cursor<'_>, n_kv: u64) -> Result<u64, String> {
    let mut keys = std::collections::HashSet::new();
    let mut alignment = DEFAULT_ALIGNMENT;
    for _ in 0..n_kv {
        let key = c.string("a metadata key")?;
        if !keys.insert(key.clone()) {
            return Err(format!("metadata key `{key}` appears twice"));
        }
        let ty = c.u32(&format!("the type of `{key}`"))?;
        let value = c.value(ty, &key, 0)?;
        if key == "general.alignment" {
            let a = value.ok_or_else(|| {
                format!("`general.alignment` has value type {ty}, expected u32 (type 4)")
            })?;
            if !a.is_power_of_two() {
                return Err(format!(
                    "`general.alignment` is {a}, expected a power of two"
                ));
            }
            alignment = u64::from(a);
        }
    }
    Ok(alignment)
}

/// Checks that the tensors' data lie as ggml lays them out: in header order, each at the
/// running offset padded to `alignment`, and inside the file of `file_len` bytes.
fn check_data_layout(
    tensors: &[TensorInfo],
    data_offset: u64,
    alignment: u64,
    file_len: u64,
) -> Result<(), String> {
    let mut expected = 0u64;
    let mut previous: Option<&str> = None;
    for t in tensors {
        if t.offset != expected {
            let after = previous.map_or(String::new(), |p| format!(" after `{p}`"));
            let why = if t.offset % alignment != 0 {
                format!("is not a multiple of the alignment {alignment}")
            } else if t.offset < expected {
                format!("overlaps the data{after}")
            } else {
                format!("leaves a gap of {} bytes{after}", t.offset - expected)
            };
            return Err(format!(
                "tensor `{}` has data offset {} which {why} (expected {expected}: tensors are stored in order, each padded to {alignment} bytes)",
                t.name, t.offset
            ));
        }
        let end = data_offset.saturating_add(t.offset).saturating_add(t.bytes);
        if end > file_len {
            return Err(format!(
                "truncated: tensor `{}` ends at byte {end} but the file has {file_len} bytes",
                t.name
            ));
        }
        expected = t
            .offset
            .checked_add(t.bytes.div_ceil(alignment) * alignment)
            .ok_or_else(|| format!("tensor `{}`: the data section overflows", t.name))?;
        previous = Some(&t.name);
    }
    Ok(())
}

/// Reads and checks one tensor's header entry.
fn tensor_info(c: &mut Cursor<'_>) -> Result<TensorInfo, String> {
    let name = c.string("a tensor name")?;
    if name.len() > MAX_NAME {
        return Err(format!(
            "tensor name `{name}` is {} bytes long, more than {MAX_NAME}",
            name.len()
        ));
    }
    let n_dims = c.u32(&format!("the dimension count of `{name}`"))?;
    if n_dims > MAX_DIMS {
        return Err(format!(
            "tensor `{name}` has {n_dims} dimensions, at most {MAX_DIMS} are allowed"
        ));
    }
    let mut dims = Vec::with_capacity(n_dims as usize);
    for _ in 0..n_dims {
        let d = c.len(&format!("a dimension of `{name}`"))?;
        if d > i64::MAX as u64 {
            return Err(format!(
                "tensor `{name}` has a negative dimension ({})",
                d as i64
            ));
        }
        dims.push(d);
    }
    let ty = c.u32(&format!("the type of `{name}`"))?;
    let offset = c.u64(&format!("the data offset of `{name}`"))?;
    let dtype = ggml_type(ty)
        .ok_or_else(|| format!("tensor `{name}` has type {ty}, which agate cannot read"))?;
    let (block, type_size) = (dtype.block_size() as u64, dtype.type_size() as u64);
    let row = dims.first().copied().unwrap_or(1);
    if row % block != 0 {
        return Err(format!(
            "tensor `{name}` of type {dtype:?} has rows of {row} elements, not a multiple of its block size {block}"
        ));
    }
    let elements = dims
        .iter()
        .try_fold(1u64, |acc, &d| acc.checked_mul(d))
        .filter(|&e| e <= i64::MAX as u64)
        .ok_or_else(|| format!("tensor `{name}`: the element count of {dims:?} overflows"))?;
    let bytes = (elements / block)
        .checked_mul(type_size)
        .ok_or_else(|| format!("tensor `{name}`: the byte size of {dims:?} overflows"))?;
    Ok(TensorInfo {
        name,
        bytes,
        offset,
    })
}

/// The ggml tensor types candle reads, by their number in the file (`ggml_type`).
fn ggml_type(ty: u32) -> Option<GgmlDType> {
    use GgmlDType::*;
    Some(match ty {
        0 => F32,
        1 => F16,
        2 => Q4_0,
        3 => Q4_1,
        6 => Q5_0,
        7 => Q5_1,
        8 => Q8_0,
        9 => Q8_1,
        10 => Q2K,
        11 => Q3K,
        12 => Q4K,
        13 => Q5K,
        14 => Q6K,
        15 => Q8K,
        30 => BF16,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GGUF v3 file: `kv` as (key, type, value bytes), then tensors (name, dims, type, offset)
    /// with `data` bytes after the aligned header.
    fn file(
        kv: &[(&str, u32, Vec<u8>)],
        tensors: &[(&str, &[u64], u32, u64)],
        data: usize,
    ) -> Vec<u8> {
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend((tensors.len() as u64).to_le_bytes());
        b.extend((kv.len() as u64).to_le_bytes());
        let string = |b: &mut Vec<u8>, s: &str| {
            b.extend((s.len() as u64).to_le_bytes());
            b.extend(s.as_bytes());
        };
        for (k, ty, v) in kv {
            string(&mut b, k);
            b.extend(ty.to_le_bytes());
            b.extend(v);
        }
        for (name, dims, ty, offset) in tensors {
            string(&mut b, name);
            b.extend((dims.len() as u32).to_le_bytes());
            for d in *dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(offset.to_le_bytes());
        }
        b.resize(b.len().div_ceil(32) * 32 + data, 0);
        b
    }

    #[test]
    fn accepts_what_ggml_writes_and_names_every_fault() {
        // Two f32 tensors of 3 and 8 elements: 12 bytes padded to 32, then 32.
        let ok = file(&[], &[("a", &[3], 0, 0), ("b", &[8], 0, 32)], 64);
        assert_eq!(check(&ok).unwrap().alignment, 32);
        let err = |kv: &[(&str, u32, Vec<u8>)], t: &[(&str, &[u64], u32, u64)], data| {
            check(&file(kv, t, data)).unwrap_err()
        };
        assert!(err(&[], &[("a", &[3], 0, 0), ("b", &[8], 0, 16)], 64)
            .contains("tensor `b` has data offset 16 which is not a multiple of the alignment 32"));
        assert!(err(&[], &[("a", &[16], 0, 0), ("b", &[8], 0, 32)], 96)
            .contains("tensor `b` has data offset 32 which overlaps the data after `a`"));
        assert!(err(&[], &[("a", &[3], 0, 0), ("b", &[8], 0, 64)], 96).contains("leaves a gap"));
        assert!(err(&[], &[("a", &[3], 0, 0), ("b", &[8], 0, 32)], 40).contains("truncated"));
        assert!(err(&[], &[("a", &[3], 0, 0), ("a", &[8], 0, 32)], 64).contains("appears twice"));
        // Q4_0 rows must hold whole 32-element blocks.
        assert!(
            err(&[], &[("q", &[16, 2], 2, 0)], 64).contains("not a multiple of its block size 32")
        );
        assert!(err(&[], &[("a", &[u64::MAX], 0, 0)], 0).contains("negative dimension"));
        assert!(err(&[], &[("a", &[1 << 40, 1 << 40], 0, 0)], 0).contains("overflows"));
        assert!(err(&[], &[("a", &[1, 1, 1, 1, 1], 0, 0)], 0).contains("5 dimensions"));
        assert!(err(&[], &[("a", &[4], 99, 0)], 32).contains("type 99"));
        let align = |ty: u32, v: Vec<u8>| err(&[("general.alignment", ty, v)], &[], 0);
        assert!(align(4, 0u32.to_le_bytes().to_vec()).contains("is 0, expected a power of two"));
        assert!(align(4, 48u32.to_le_bytes().to_vec()).contains("is 48"));
        assert!(align(5, 32i32.to_le_bytes().to_vec()).contains("expected u32"));
        let dup = [("k", 4, vec![0; 4]), ("k", 4, vec![0; 4])];
        assert!(err(&dup, &[], 0).contains("`k` appears twice"));
        assert!(check(&ok[..30])
            .unwrap_err()
            .contains("more than its 6 bytes can hold"));
        let one = file(&[], &[("a", &[3], 0, 0)], 32);
        assert!(check(&one[..50]).unwrap_err().contains("truncated header"));
        assert!(check(b"GGML").unwrap_err().contains("not the GGUF magic"));
    }
}
