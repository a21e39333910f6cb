//! "Did you mean": the one typo matcher every tool uses for unknown keys, model names, check
//! ids and flags, so the launcher, the converter and the engine suggest the same word for the
//! same slip.
//!
//! Damerau–Levenshtein distance (a swap of two letters counts once), at most a third of the
//! word's length. A case-only difference always matches. Short words (three letters or fewer)
//! get a suggestion only for a missing or extra letter (`adr` → `addr`) or swapped letters
//! (`nup` → `npu`): three-letter values such as npu/gpu/cpu are one substitution apart from each
//! other and from tpu or xpu, and suggesting one for another would mislead.

/// The closest candidate, if it is close enough to be a likely typo of `word`.
pub fn did_you_mean<'a, S: AsRef<str>>(word: &str, candidates: &'a [S]) -> Option<&'a str> {
    if let Some(c) = candidates.iter().find(|c| c.as_ref().eq_ignore_ascii_case(word)) {
        return Some(c.as_ref());
    }
    let len = word.chars().count();
    let limit = (len / 3).max(1);
    let plausible = |c: &str| {
        if len > 3 {
            return true;
        }
        let mut a: Vec<char> = word.chars().collect();
        let mut b: Vec<char> = c.chars().collect();
        if a.len() != b.len() {
            return true;
        }
        a.sort_unstable();
        b.sort_unstable();
        a == b
    };
    candidates
        .iter()
        .map(AsRef::as_ref)
        .filter(|c| plausible(c))
        .map(|c| (strsim::damerau_levenshtein(word, c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// `", did you mean `x`?"` or nothing: the suffix every message appends.
pub fn hint<S: AsRef<str>>(word: &str, candidates: &[S]) -> String {
    did_you_mean(word, candidates).map(|s| format!(", did you mean `{s}`?")).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typos_and_case() {
        assert_eq!(did_you_mean("adr", &["addr", "port"]), Some("addr"));
        assert_eq!(did_you_mean("lrr", &["lr", "min_lr"]), Some("lr"));
        assert_eq!(did_you_mean("nup", &["npu", "gpu", "cpu"]), Some("npu"));
        assert_eq!(did_you_mean("TINY", &["tiny", "8b"]), Some("tiny"));
        assert_eq!(did_you_mean("tran_iters", &["train_iters", "seq_length"]), Some("train_iters"));
    }

    #[test]
    fn no_misleading_suggestions() {
        // tpu is one substitution from npu/gpu/cpu: no suggestion.
        assert_eq!(did_you_mean("tpu", &["npu", "gpu", "cpu"]), None);
        assert_eq!(did_you_mean("zzzzzz", &["addr", "port"]), None);
        assert_eq!(did_you_mean("x", &Vec::<String>::new()), None);
        assert_eq!(hint("qqqqqqq", &["addr"]), "");
        assert_eq!(hint("adr", &["addr"]), ", did you mean `addr`?");
    }
}
