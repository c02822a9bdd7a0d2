//! The one layer-selection syntax, shared by every verb: `--layer N` or
//! `--layers SPEC`, where SPEC is a comma-separated list of layers `N` and
//! inclusive ranges `A..=B` (e.g. `0..=3,12,23`). `A..B` is refused: half
//! the tools in the field read it as inclusive and half as exclusive.

use anyhow::{bail, Context, Result};

/// The layers a verb works on: `None` means every layer. Checked against
/// `n_layer` (the model's layer count); sorted and without repeats.
pub fn select_layers(layer: Option<usize>, layers: Option<&str>, n_layer: usize) -> Result<Option<Vec<usize>>> {
    let check = |l: usize| -> Result<usize> {
        if l >= n_layer {
            bail!("layer {l} out of range: the model has {n_layer} layers (0..={})", n_layer.saturating_sub(1));
        }
        Ok(l)
    };
    let selected = match (layer, layers) {
        (Some(_), Some(_)) => bail!("give --layer or --layers, not both"),
        (None, None) => return Ok(None),
        (Some(l), None) => vec![check(l)?],
        (None, Some(spec)) => {
            let mut out = Vec::new();
            for part in spec.split(',').map(str::trim) {
                out.extend(parse_part(spec, part)?.into_iter().map(check).collect::<Result<Vec<_>>>()?);
            }
            out
        }
    };
    let mut selected = selected;
    selected.sort_unstable();
    selected.dedup();
    Ok(Some(selected))
}

fn parse_part(spec: &str, part: &str) -> Result<Vec<usize>> {
    let number = |s: &str| -> Result<usize> {
        s.trim().parse().with_context(|| format!("--layers {spec:?}: {s:?} is not a layer number"))
    };
    if let Some((a, b)) = part.split_once("..=") {
        let (a, b) = (number(a)?, number(b)?);
        if a > b {
            bail!("--layers {spec:?}: the range {a}..={b} is reversed (write {b}..={a})");
        }
        return Ok((a..=b).collect());
    }
    if let Some((a, b)) = part.split_once("..") {
        bail!("--layers {spec:?}: write {a}..={b} for layers {a} to {b} with both ends included ({a}..{b} is ambiguous and refused)");
    }
    if part.is_empty() {
        bail!("--layers {spec:?}: empty entry; expected e.g. 0..=3,12");
    }
    Ok(vec![number(part)?])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_syntax() {
        assert_eq!(select_layers(None, None, 24).unwrap(), None);
        assert_eq!(select_layers(Some(3), None, 24).unwrap(), Some(vec![3]));
        assert_eq!(select_layers(None, Some("2..=4"), 24).unwrap(), Some(vec![2, 3, 4]));
        assert_eq!(select_layers(None, Some("23, 0..=1,1"), 24).unwrap(), Some(vec![0, 1, 23]));
        assert_eq!(select_layers(None, Some("7"), 24).unwrap(), Some(vec![7]));
    }

    #[test]
    fn refusals_name_the_fix() {
        let err = |l: Option<usize>, s: Option<&str>| select_layers(l, s, 24).unwrap_err().to_string();
        assert_eq!(err(Some(30), None), "layer 30 out of range: the model has 24 layers (0..=23)");
        assert!(err(None, Some("0..4")).contains("write 0..=4"), "{}", err(None, Some("0..4")));
        assert!(err(None, Some("5..=2")).contains("reversed"));
        assert!(err(None, Some("0..=24")).contains("out of range"));
        assert!(err(None, Some("x")).contains("not a layer number"));
        assert!(err(None, Some("1,,2")).contains("empty entry"));
        assert!(err(Some(1), Some("1..=2")).contains("not both"));
    }
}
