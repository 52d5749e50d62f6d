//! The report as one self-contained HTML file: no script, no external reference (fonts, styles
//! and all are inline), every value escaped, laid out to print.

use super::{Report, Verdict};
use std::fmt::Write;

fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2rem;color:#111;max-width:60rem}\
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem;border-bottom:1px solid #999}\
table{border-collapse:collapse;width:100%}td,th{border:1px solid #bbb;padding:.3rem .5rem;\
vertical-align:top;text-align:left}.pass{color:#05631d}.attention{color:#8a5a00}.fail{color:#a00}\
pre{white-space:pre-wrap;font-size:.75rem;margin:0}@media print{body{margin:0}h2{break-after:avoid}\
tr{break-inside:avoid}}";

/// The Content-Security-Policy of the report served as a file: its one inline style, allowed by
/// its hash, and nothing else.
pub static CSP: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
    use base64::Engine;
    use sha2::Digest;
    let hash = base64::engine::general_purpose::STANDARD.encode(sha2::Sha256::digest(STYLE.as_bytes()));
    format!(
        "default-src 'none'; style-src 'sha256-{hash}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
});

/// Renders the report.
pub fn render(report: &Report) -> String {
    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>fhirvault compliance report</title>\
         <style>{STYLE}</style></head><body><h1>Technical safeguards (45 CFR 164.312): live evidence</h1>\
         <p>Generated {} for the period from {}. Deployment: <code>{}</code>.</p>\
         <table><thead><tr><th scope=\"col\">Standard</th><th scope=\"col\">Verdict</th></tr></thead><tbody>",
        esc(&report.generated),
        esc(&report.period_start),
        esc(&report.deployment.to_string()),
    );
    for s in &report.sections {
        let v = s.verdict();
        let _ = write!(
            h,
            "<tr><td>{} {}</td><td class=\"{}\">{}</td></tr>",
            esc(&s.citation),
            esc(&s.title),
            v.as_str(),
            v.as_str()
        );
    }
    h.push_str("</tbody></table>");
    for s in &report.sections {
        let _ = write!(
            h,
            "<h2>{} {}</h2><table><thead><tr><th scope=\"col\">Check</th><th scope=\"col\">Verdict</th>\
             <th scope=\"col\">Reason</th><th scope=\"col\">Evidence</th></tr></thead><tbody>",
            esc(&s.citation),
            esc(&s.title)
        );
        for c in &s.checks {
            let evidence = serde_json::to_string_pretty(&c.evidence).unwrap_or_default();
            let _ = write!(
                h,
                "<tr><td>{}</td><td class=\"{}\">{}</td><td>{}</td><td><pre>{}</pre></td></tr>",
                esc(&c.name),
                c.verdict.as_str(),
                c.verdict.as_str(),
                esc(&c.reason),
                esc(&evidence)
            );
        }
        h.push_str("</tbody></table>");
    }
    let worst = report
        .sections
        .iter()
        .map(|s| s.verdict())
        .max_by_key(|v| *v as u8)
        .unwrap_or(Verdict::Pass);
    let _ = write!(
        h,
        "<p>Overall: <strong class=\"{}\">{}</strong>.</p></body></html>",
        worst.as_str(),
        worst.as_str()
    );
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_escaped() {
        assert_eq!(esc("<script>&\"'"), "&lt;script&gt;&amp;&quot;&#39;");
    }
}
