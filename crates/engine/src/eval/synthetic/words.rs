//! The random material of the synthetic tasks: shuffles, UUIDs, distinct keys (adjective-noun
//! pairs) and variable names, all drawn from the caller's seeded generator.

use rand::rngs::StdRng;
use rand::Rng;

pub(super) fn shuffle<T>(v: &mut [T], rng: &mut StdRng) {
    for i in (1..v.len()).rev() {
        let j = rng.random_range(0..=i);
        v.swap(i, j);
    }
}

pub(super) fn uuid(rng: &mut StdRng) -> String {
    let hex: String = (0..32)
        .map(|_| char::from_digit(rng.random_range(0..16), 16).unwrap_or('0'))
        .collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

pub(super) fn distinct_keys(rng: &mut StdRng, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while out.len() < n {
        let k = format!(
            "{}-{}",
            ADJECTIVES[rng.random_range(0..ADJECTIVES.len())],
            WORDS[rng.random_range(0..WORDS.len())]
        );
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

pub(super) fn distinct_var_names(rng: &mut StdRng, n: usize) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    while out.len() < n {
        let k: String = (0..5)
            .map(|_| char::from(b'A' + rng.random_range(0..26u8)))
            .collect();
        if !out.contains(&k) {
            out.push(k);
        }
    }
    out
}

pub(super) const ADJECTIVES: &[&str] = &[
    "ancient", "bitter", "brave", "calm", "clever", "crooked", "curious", "damp", "eager",
    "elegant", "fancy", "fierce", "gentle", "gloomy", "grumpy", "hollow", "humble", "jolly",
    "lazy", "lively", "lucky", "mighty", "noisy", "odd", "plain", "proud", "quiet", "rapid",
    "rough", "shiny", "silent", "silly", "sleepy", "smooth", "sour", "spicy", "steep", "sturdy",
    "tender", "tidy", "tiny", "vast", "wicked", "wild", "wise", "witty", "young", "zealous",
];

pub(super) const WORDS: &[&str] = &[
    "apple", "anchor", "badge", "basket", "beacon", "blanket", "bottle", "bridge", "bucket",
    "button", "cabin", "camera", "candle", "canyon", "carpet", "castle", "cactus", "chair",
    "cherry", "circle", "cloud", "compass", "copper", "cottage", "crayon", "dagger", "desert",
    "dinner", "dragon", "drum", "eagle", "engine", "feather", "fence", "forest", "fountain",
    "garden", "garlic", "ginger", "glacier", "guitar", "hammer", "harbor", "helmet", "honey",
    "island", "jacket", "jungle", "kettle", "kitten", "ladder", "lantern", "lemon", "lizard",
    "magnet", "marble", "meadow", "mirror", "monkey", "needle", "noodle", "ocean", "orange",
    "oyster", "paddle", "parrot", "pebble", "pencil", "pepper", "piano", "pillow", "planet",
    "pocket", "potato", "puzzle", "rabbit", "radio", "ribbon", "river", "rocket", "saddle",
    "salmon", "sandal", "scarf", "shadow", "shovel", "silver", "spider", "spoon", "squirrel",
    "statue", "stone", "sugar", "sunset", "swan", "table", "teapot", "thunder", "tiger", "tomato",
    "towel", "tractor", "trumpet", "tunnel", "turtle", "umbrella", "valley", "velvet", "violin",
    "wagon", "walnut", "window", "winter", "wizard", "wolf", "yogurt", "zebra", "acorn", "barrel",
    "biscuit", "blossom", "boulder", "canoe", "chimney", "cobweb", "cricket", "dolphin", "falcon",
    "goblet", "hedgehog", "iceberg", "jigsaw", "kayak", "lobster", "mango", "nectar", "orchid",
    "pelican", "quilt", "raisin", "sparrow", "thimble", "tulip", "walrus", "whistle",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_lists_are_distinct() {
        let mut w = WORDS.to_vec();
        w.sort_unstable();
        w.dedup();
        assert_eq!(w.len(), WORDS.len());
    }
}
