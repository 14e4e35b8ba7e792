//! A reader for the Prometheus text exposition format, enough for `meshctl` to read the nodes'
//! `/metrics`: samples with their labels, comments skipped. Bad lines are skipped and counted,
//! never a panic: the input comes from the network.

use std::collections::BTreeMap;

/// One sample: family name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

impl Sample {
    pub fn label(&self, k: &str) -> &str {
        self.labels.get(k).map(String::as_str).unwrap_or("")
    }
}

/// Parses a whole exposition; returns the samples and how many lines could not be read.
pub fn parse(text: &str) -> (Vec<Sample>, usize) {
    let mut out = Vec::new();
    let mut bad = 0;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_line(line) {
            Some(s) => out.push(s),
            None => bad += 1,
        }
    }
    (out, bad)
}

fn parse_line(line: &str) -> Option<Sample> {
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    if name.is_empty() {
        return None;
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(r) = rest.strip_prefix('{') {
        rest = r;
        loop {
            rest = rest.trim_start_matches([' ', ',']);
            if let Some(r) = rest.strip_prefix('}') {
                rest = r;
                break;
            }
            let eq = rest.find('=')?;
            let key = rest[..eq].trim().to_string();
            rest = rest[eq + 1..].strip_prefix('"')?;
            let mut value = String::new();
            let mut chars = rest.char_indices();
            let end = loop {
                let (i, c) = chars.next()?;
                match c {
                    '\\' => match chars.next()?.1 {
                        'n' => value.push('\n'),
                        other => value.push(other),
                    },
                    '"' => break i,
                    c => value.push(c),
                }
            };
            labels.insert(key, value);
            rest = &rest[end + 1..];
        }
    }
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_samples_labels_and_escapes() {
        let text = "# HELP x y\n# TYPE x counter\nx 3\ny{a=\"1\",b=\"q\\\"uote\"} 4.5\n\
                    z{le=\"+Inf\"} +Inf\nbroken{a=\"1\" 2\n\nw{} 7 1700000000\n";
        let (s, bad) = parse(text);
        assert_eq!(bad, 1);
        assert_eq!(s.len(), 4);
        assert_eq!(s[0].name, "x");
        assert_eq!(s[0].value, 3.0);
        assert_eq!(s[1].label("a"), "1");
        assert_eq!(s[1].label("b"), "q\"uote");
        assert_eq!(s[1].value, 4.5);
        assert!(s[2].value.is_infinite());
        assert_eq!(s[3].value, 7.0);
    }

    #[test]
    fn garbage_is_counted_not_a_panic() {
        for g in [
            "{",
            "x{",
            "x{a}",
            "x{a=}",
            "x{a=\"",
            "x 1e999999",
            "x nope",
            "\u{0}",
        ] {
            let (_, bad) = parse(g);
            assert!(bad <= 1, "{g:?}");
        }
    }
}
