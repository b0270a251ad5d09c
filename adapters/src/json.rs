//! Indents compact JSON without reordering or re-encoding anything, so the
//! golden files stay readable while still holding the adapter's exact bytes
//! (serde_json's own pretty printer would go through a sorted `Value`).

/// Re-indents `compact` JSON with two spaces. Whitespace outside strings is
/// dropped first, so the result depends only on the tokens.
pub fn indent(compact: &str) -> String {
    let bytes = compact.as_bytes();
    let mut out = String::with_capacity(compact.len() * 2);
    let mut depth = 0usize;
    let mut i = 0;
    let newline = |out: &mut String, depth: usize| {
        out.push('\n');
        for _ in 0..depth {
            out.push_str("  ");
        }
    };
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'"' => {
                // Copy the whole string, escapes included.
                let start = i;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    if bytes[i] == b'\\' {
                        i += 1;
                    }
                    i += 1;
                }
                let end = (i + 1).min(bytes.len());
                out.push_str(&compact[start..end]);
                i = end;
                continue;
            }
            b'[' if scalar_array_end(bytes, i).is_some() => {
                // Arrays of scalars (header pairs) stay on one line.
                let end = scalar_array_end(bytes, i).unwrap_or(i);
                let inner = indent(&compact[i + 1..end]);
                out.push('[');
                out.push_str(&inner.replace(",\n", ", ").replace('\n', ""));
                out.push(']');
                i = end + 1;
                continue;
            }
            b'{' | b'[' => {
                let close = if c == b'{' { b'}' } else { b']' };
                let next = bytes[i + 1..].iter().position(|b| !b.is_ascii_whitespace());
                if next.map(|n| bytes[i + 1 + n]) == Some(close) {
                    out.push(c as char);
                    out.push(close as char);
                    i += 2 + next.unwrap_or(0);
                    continue;
                }
                out.push(c as char);
                depth += 1;
                newline(&mut out, depth);
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                newline(&mut out, depth);
                out.push(c as char);
            }
            b',' => {
                out.push(',');
                newline(&mut out, depth);
            }
            b':' => out.push_str(": "),
            c if c.is_ascii_whitespace() => {}
            _ => {
                // Numbers, literals: copy up to the next structural byte.
                let start = i;
                while i < bytes.len() && !b",:{}[]\" \t\r\n".contains(&bytes[i]) {
                    i += 1;
                }
                out.push_str(&compact[start..i]);
                continue;
            }
        }
        i += 1;
    }
    out
}

/// The index of the `]` closing the array at `open` when it holds only
/// scalars; `None` when it nests a container or is empty.
fn scalar_array_end(bytes: &[u8], open: usize) -> Option<usize> {
    let (mut i, mut in_string, mut seen) = (open + 1, false, false);
    while i < bytes.len() {
        let b = bytes[i];
        if in_string {
            match b {
                b'\\' => i += 1,
                b'"' => in_string = false,
                _ => {}
            }
        } else {
            match b {
                b'"' => {
                    in_string = true;
                    seen = true;
                }
                b'{' | b'[' => return None,
                b']' => return seen.then_some(i),
                c if !c.is_ascii_whitespace() => seen = true,
                _ => {}
            }
        }
        i += 1;
    }
    None
}

/// `s` without whitespace outside strings: `compact(indent(x)) == x` for
/// compact `x`, which is what makes a golden file exact.
pub fn compact(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in s.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if !c.is_ascii_whitespace() {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_string_bytes() {
        let compact = r#"{"b":1,"a":[true,null,{}],"s":"x,\"y\":{[","e":[],"n":-1.5e3}"#;
        let pretty = indent(compact);
        assert_eq!(
            pretty,
            "{\n  \"b\": 1,\n  \"a\": [\n    true,\n    null,\n    {}\n  ],\n  \"s\": \"x,\\\"y\\\":{[\",\n  \"e\": [],\n  \"n\": -1.5e3\n}"
        );
        let pairs = r#"[["a","b,\"]"],[1,2]]"#;
        assert_eq!(indent(pairs), "[\n  [\"a\", \"b,\\\"]\"],\n  [1, 2]\n]");
        assert_eq!(super::compact(&indent(pairs)), pairs);
        let back: serde_json::Value = serde_json::from_str(&pretty).unwrap();
        assert_eq!(
            back,
            serde_json::from_str::<serde_json::Value>(compact).unwrap()
        );
        assert_eq!(indent(&pretty), pretty);
        assert_eq!(super::compact(&pretty), compact);
    }
}
