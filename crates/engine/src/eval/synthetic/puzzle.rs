//! The needle puzzles of the synthetic families that hide facts in a haystack (passkey, NIAH,
//! multi-key NIAH, variable tracking): what is inserted where, what is asked and what answers it.
//! Draws from the task's seeded generator in a fixed order, so a seed gives the same task.

use rand::rngs::StdRng;
use rand::Rng;

use super::words::{distinct_keys, distinct_var_names};
use super::{Family, Insert, MatchKind, SyntheticSpec};

/// A needle task before its haystack: prompt prefix, inserts, question, answer prefix, answer
/// and how the answer is matched.
pub(super) type Puzzle = (&'static str, Vec<Insert>, String, String, String, MatchKind);

/// The puzzle of a passkey, NIAH or variable-tracking task with its (first) needle at depth `d`
/// (`None` for the families built otherwise: KV retrieval, common words).
pub(super) fn puzzle(spec: &SyntheticSpec, d: f64, rng: &mut StdRng) -> Option<Puzzle> {
    Some(match spec.family {
        Family::Passkey => {
            let key = rng.random_range(10_000..100_000u32);
            (
                "There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. I will quiz you about the important information there.",
                vec![Insert {
                    depth: d,
                    text: format!("The pass key is {key}. Remember it. {key} is the pass key."),
                    asked: true,
                }],
                "What is the pass key?".to_string(),
                " The pass key is".to_string(),
                key.to_string(),
                MatchKind::Contains,
            )
        }
        Family::Niah | Family::NiahMulti => {
            let n_keys = if spec.family == Family::Niah {
                1
            } else {
                spec.keys
            };
            let keys = distinct_keys(rng, n_keys);
            let values: Vec<u32> = (0..n_keys)
                .map(|_| rng.random_range(1_000_000..10_000_000))
                .collect();
            let mut inserts: Vec<Insert> = keys
                .iter()
                .zip(&values)
                .enumerate()
                .map(|(i, (k, v))| Insert {
                    depth: if i == 0 {
                        d
                    } else {
                        rng.random_range(0.0..=1.0)
                    },
                    text: format!("One of the special magic numbers for {k} is: {v}."),
                    asked: i == 0,
                })
                .collect();
            inserts.sort_by(|a, b| a.depth.total_cmp(&b.depth));
            let key = &keys[0];
            (
                "Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz you about the numbers afterwards.",
                inserts,
                format!("What is the special magic number for {key} mentioned in the provided text?"),
                format!(" The special magic number for {key} mentioned in the provided text is"),
                values[0].to_string(),
                MatchKind::Contains,
            )
        }
        Family::Vt => {
            let names = distinct_var_names(rng, 5);
            let value = rng.random_range(10_000..100_000u32);
            let inserts = names
                .iter()
                .enumerate()
                .map(|(i, n)| Insert {
                    depth: (i as f64 + 0.5) / names.len() as f64,
                    text: if i == 0 {
                        format!("VAR {n} = {value}.")
                    } else {
                        format!("VAR {n} = VAR {}.", names[i - 1])
                    },
                    asked: i == 0,
                })
                .collect();
            (
                "Memorize and track the chain(s) of variable assignment hidden in the following text.",
                inserts,
                format!("Question: Find all variables that are assigned the value {value} in the text above."),
                format!(" Answer: According to the chain(s) of variables assigned in the text above, {} variables are assigned the value {value}, they are:", names.len()),
                names.join(", "),
                MatchKind::All,
            )
        }
        Family::Kv | Family::Cwe => return None,
    })
}
