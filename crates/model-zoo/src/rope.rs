//! The decoder's rotary position embedding: gate-core's [`Rope`] (agate's one rotation: in
//! place for the decoder, with tensor ops for the training forward, both layouts; its tests hold
//! the two equal) with this model's frequency scaling (linear, Llama 3).

pub use gate_core::rope::{Rope, RopeLayout, RopeTables};

use crate::config::{ModelConfig, RopeScaling};

/// The rotation of `cfg`'s attention heads (its head dimension, base and scaling) in `layout`.
pub fn model_rope(cfg: &ModelConfig, layout: RopeLayout) -> Rope {
    let scaling = cfg.rope_scaling.as_ref();
    Rope::scaled(cfg.head_dim, cfg.rope_theta, layout, |f| {
        scaled_frequency(f, scaling)
    })
}

/// One inverse frequency `f` under `scaling`.
fn scaled_frequency(f: f64, scaling: Option<&RopeScaling>) -> f64 {
    match scaling {
        None => f,
        Some(RopeScaling::Linear { factor }) => f / *factor as f64,
        Some(RopeScaling::Llama3(s)) => {
            let (factor, low, high) = (
                s.factor as f64,
                s.low_freq_factor as f64,
                s.high_freq_factor as f64,
            );
            let orig = s.original_max_position as f64;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            let (low_wavelen, high_wavelen) = (orig / low, orig / high);
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (orig / wavelen - low) / (high - low);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}
