//! Search: the parameter registry loaded from the official R4 definitions, index values
//! extracted through FHIRPath on every write (PHI only as blind indexes), and the parsing of
//! search requests into the store's typed queries (`query`).

pub mod extract;
pub mod granular;
pub mod live;
pub mod query;
pub mod registry;

pub use extract::{extract, fold, IndexValue};
pub use registry::{ParamType, Registry, SearchParam};

use crate::crypto::Cipher;
use crate::store::search_index::SearchRow;
use serde_json::Value;

/// How many leading characters of a PHI string get their own blind index (prefix search);
/// longer prefixes are matched on this many and re-checked after decryption. Six keep the
/// candidates of a longer prefix few while each value costs at most seven index rows.
pub const BLIND_PREFIX_MAX: usize = 6;

/// The blind-index keys of an identifying token (identifier, telecom): one a search for the
/// bare value finds (any system), and one for `system|value` (`|value`: no system).
pub fn blind_token_keys(system: Option<&str>, value: &str) -> [String; 2] {
    [format!("\u{0}any|{value}"), format!("{}|{value}", system.unwrap_or(""))]
}

/// The blind-index keys of a PHI string value: the folded whole, and its prefixes shorter than
/// the whole up to `BLIND_PREFIX_MAX` (a search for a prefix as long as the value matches the
/// whole instead, so that row is not repeated).
pub fn blind_string_keys(param: &str, folded: &str) -> Vec<(String, String)> {
    let chars: Vec<char> = folded.chars().collect();
    let mut keys = vec![(format!("{param}~full"), folded.to_string())];
    for n in 1..=chars.len().saturating_sub(1).min(BLIND_PREFIX_MAX) {
        keys.push((format!("{param}~prefix"), chars[..n].iter().collect()));
    }
    keys
}

/// The distinct three-character pieces of a folded PHI string (`:contains` through blind
/// indexes: a value contains the searched text only if it has all of its pieces).
pub fn trigrams(folded: &str) -> Vec<String> {
    let chars: Vec<char> = folded.chars().collect();
    let mut out: Vec<String> = chars.windows(3).map(|w| w.iter().collect()).collect();
    out.sort();
    out.dedup();
    out
}

/// The blind-index buckets of a PHI date: its year, and its month and day where it is that
/// precise (a birth date search looks up the bucket of its own precision, or the years of a
/// range, and re-checks the candidates).
pub fn blind_date_buckets(start: chrono::NaiveDateTime, end: chrono::NaiveDateTime) -> Vec<String> {
    use chrono::Datelike;
    let d = start.date();
    let mut out = vec![format!("{:04}", d.year())];
    let days = (end - start).num_days();
    if days <= 31 {
        out.push(format!("{:04}-{:02}", d.year(), d.month()));
    }
    if days <= 1 {
        out.push(format!("{:04}-{:02}-{:02}", d.year(), d.month(), d.day()));
    }
    out
}

/// American Soundex of a word (`phonetic`): the first letter and three digits.
pub fn soundex(word: &str) -> Option<String> {
    let letters: Vec<char> = extract::fold(word)
        .chars()
        .filter(|c| c.is_ascii_alphabetic())
        .collect();
    let first = *letters.first()?;
    let digit = |c: char| match c {
        'b' | 'f' | 'p' | 'v' => Some('1'),
        'c' | 'g' | 'j' | 'k' | 'q' | 's' | 'x' | 'z' => Some('2'),
        'd' | 't' => Some('3'),
        'l' => Some('4'),
        'm' | 'n' => Some('5'),
        'r' => Some('6'),
        _ => None,
    };
    let mut out = String::from(first.to_ascii_uppercase());
    let mut last = digit(first);
    for &c in &letters[1..] {
        let d = digit(c);
        if d.is_some() && d != last {
            out.push(d.unwrap_or('0'));
            if out.len() == 4 {
                break;
            }
        }
        // h and w do not separate equal codes; vowels do
        if c != 'h' && c != 'w' {
            last = d;
        }
    }
    while out.len() < 4 {
        out.push('0');
    }
    Some(out)
}

/// The index rows of a resource: every parameter of its type evaluated on it, PHI values
/// blinded. A parameter whose expression cannot be evaluated on this content is skipped (and
/// logged by code), never failing the write.
pub fn index_rows(registry: &Registry, cipher: &Cipher, resource_type: &str, resource: &Value) -> Vec<SearchRow> {
    let mut rows = Vec::new();
    for param in registry.params(resource_type) {
        let values = match extract(param, resource) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(param = %param.code, resource_type, error = %e, "search parameter not indexed");
                continue;
            }
        };
        rows.extend(param_rows(param, cipher, values));
    }
    // the same value reached by two paths (a prefix shared by two name parts …) is one row
    let mut unique: Vec<SearchRow> = Vec::with_capacity(rows.len());
    for r in rows {
        if !unique.contains(&r) {
            unique.push(r);
        }
    }
    unique
}

/// The index rows of one parameter's values (PHI blinded).
pub fn param_rows(param: &SearchParam, cipher: &Cipher, values: Vec<IndexValue>) -> Vec<SearchRow> {
    let mut rows = Vec::new();
    {
        let code = param.code.clone();
        let blind = |key: &str, value: &str| Some(cipher.blind_index(key, value).to_vec());
        let token_blind = |key: &str| SearchRow::Token {
            param: code.clone(),
            system: None,
            code: None,
            text: None,
            blind: blind(&code, key),
        };
        for v in values {
            match v {
                IndexValue::String(s) if param.phi => {
                    if param.code == "phonetic" {
                        // a sound-alike code per word, blinded like the rest
                        for word in s.split_whitespace() {
                            if let Some(code4) = soundex(word) {
                                rows.push(SearchRow::String {
                                    param: code.clone(),
                                    value: None,
                                    exact: None,
                                    blind: blind(&format!("{code}~soundex"), &code4),
                                });
                            }
                        }
                        continue;
                    }
                    let folded = fold(&s);
                    let tri_key = format!("{code}~tri");
                    let keys = blind_string_keys(&code, &folded)
                        .into_iter()
                        .chain(trigrams(&folded).into_iter().map(|t| (tri_key.clone(), t)));
                    for (key, value) in keys {
                        rows.push(SearchRow::String {
                            param: code.clone(),
                            value: None,
                            exact: None,
                            blind: blind(&key, &value),
                        });
                    }
                }
                IndexValue::String(s) => rows.push(SearchRow::String {
                    param: code.clone(),
                    value: Some(fold(&s)),
                    exact: Some(s),
                    blind: None,
                }),
                IndexValue::Token { system, code: c } if param.phi => {
                    for key in blind_token_keys(system.as_deref(), &c) {
                        rows.push(token_blind(&key));
                    }
                }
                IndexValue::Token { system, code: c } => rows.push(SearchRow::Token {
                    param: code.clone(),
                    system,
                    code: Some(c),
                    text: None,
                    blind: None,
                }),
                IndexValue::TokenText(_) if param.phi => {}
                IndexValue::TokenText(t) => rows.push(SearchRow::Token {
                    param: code.clone(),
                    system: None,
                    code: None,
                    text: Some(fold(&t)),
                    blind: None,
                }),
                // identifiers are PHI wherever they appear: these are always blind
                IndexValue::IdentifierOfType {
                    type_system,
                    type_code,
                    value,
                } => rows.push(token_blind(&format!(
                    "of-type|{}|{type_code}|{value}",
                    type_system.as_deref().unwrap_or("")
                ))),
                IndexValue::ReferenceIdentifier { system, value } => {
                    for key in blind_token_keys(system.as_deref(), &value) {
                        rows.push(SearchRow::Token {
                            param: format!("{code}:identifier"),
                            system: None,
                            code: None,
                            text: None,
                            blind: blind(&format!("{code}:identifier"), &key),
                        });
                    }
                }
                IndexValue::Date { start, end } if param.phi => {
                    for bucket in blind_date_buckets(start, end) {
                        rows.push(SearchRow::Date {
                            param: code.clone(),
                            start: None,
                            end: None,
                            blind: blind(&format!("{code}~date"), &bucket),
                        });
                    }
                }
                IndexValue::Date { start, end } => rows.push(SearchRow::Date {
                    param: code.clone(),
                    start: Some(start),
                    end: Some(end),
                    blind: None,
                }),
                IndexValue::Reference { resource_type, id } => rows.push(SearchRow::Reference {
                    param: code.clone(),
                    target_type: resource_type,
                    target_id: id,
                }),
                IndexValue::Number(n) => rows.push(SearchRow::Number {
                    param: code.clone(),
                    value: n,
                }),
                IndexValue::Quantity { value, system, code: c } => rows.push(SearchRow::Quantity {
                    param: code.clone(),
                    value,
                    system,
                    code: c,
                }),
                IndexValue::Uri(u) => rows.push(SearchRow::Uri {
                    param: code.clone(),
                    value: u,
                }),
                IndexValue::Composite {
                    c1_system,
                    c1_code,
                    second,
                    third,
                } => {
                    let mut row = SearchRow::Composite {
                        param: code.clone(),
                        c1_system,
                        c1_code,
                        c2_system: None,
                        c2_code: None,
                        c2_number: None,
                        c2_start: None,
                        c2_end: None,
                        c2_text: None,
                        c3_number: third,
                    };
                    if let SearchRow::Composite {
                        c2_system,
                        c2_code,
                        c2_number,
                        c2_start,
                        c2_end,
                        c2_text,
                        ..
                    } = &mut row
                    {
                        match *second {
                            IndexValue::Token { system, code } => (*c2_system, *c2_code) = (system, Some(code)),
                            IndexValue::Quantity { value, system, code } => {
                                (*c2_number, *c2_system, *c2_code) = (Some(value), system, code)
                            }
                            IndexValue::Number(n) => *c2_number = Some(n),
                            IndexValue::Date { start, end } => (*c2_start, *c2_end) = (Some(start), Some(end)),
                            IndexValue::String(s) => *c2_text = Some(fold(&s)),
                            _ => continue,
                        }
                    }
                    rows.push(row);
                }
            }
        }
    }
    rows
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soundex_codes_sound_alikes_alike() {
        assert_eq!(soundex("Robert").as_deref(), Some("R163"));
        assert_eq!(soundex("Rupert").as_deref(), Some("R163"));
        assert_eq!(soundex("Ashcraft").as_deref(), Some("A261"));
        assert_eq!(soundex("Tymczak").as_deref(), Some("T522"));
        assert_eq!(soundex("Pfister").as_deref(), Some("P236"));
        assert_eq!(soundex("Lee").as_deref(), Some("L000"));
        assert_eq!(soundex("42"), None);
    }

    #[test]
    fn the_identifying_list_decides_what_is_blind() {
        let cipher = crate::crypto::test_cipher();
        let patient = serde_json::json!({"resourceType": "Patient", "gender": "female"});
        let gender = |r: &Registry| -> Vec<SearchRow> {
            index_rows(r, &cipher, "Patient", &patient)
                .into_iter()
                .filter(|row| matches!(row, SearchRow::Token { param, .. } if param == "gender"))
                .collect()
        };
        let plain = gender(&Registry::r4().unwrap());
        assert!(matches!(&plain[0], SearchRow::Token { code: Some(c), blind: None, .. } if c == "female"));
        let mut list = registry::default_phi();
        list.push("Patient.gender".into());
        let blind = gender(&Registry::r4_with_phi(&list).unwrap());
        assert!(!blind.is_empty());
        assert!(blind.iter().all(|r| matches!(
            r,
            SearchRow::Token {
                code: None,
                blind: Some(_),
                ..
            }
        )));
    }

    #[test]
    fn blind_token_keys_match_queries() {
        let mut keys = Vec::new();
        keys.extend(blind_token_keys(Some("urn:s"), "1"));
        keys.extend(blind_token_keys(None, "2"));
        for q in ["urn:s|1", "1", "2", "|2"] {
            assert!(keys.contains(&query::blind_token_key(q).unwrap()), "{q}");
        }
        assert!(
            !keys.contains(&query::blind_token_key("|1").unwrap()),
            "|1 means no system"
        );
        assert!(!keys.contains(&query::blind_token_key("urn:x|1").unwrap()));
        assert_eq!(query::blind_token_key("|"), None);
        assert_eq!(query::blind_token_key("urn:s|"), None);
    }

    #[test]
    fn blind_prefixes_stop_short_of_the_whole_value() {
        let keys = blind_string_keys("name", "smith");
        assert_eq!(keys.len(), 5, "the whole and four prefixes: {keys:?}");
        let keys = blind_string_keys("name", "schwarzenegger");
        assert_eq!(keys.len(), 1 + BLIND_PREFIX_MAX);
    }
}
