//! Configs read from files are checked before any tensor is built from them: a field out of range, or two that do
//! not fit together (channels that a head count or a group count does not divide, one block type per level), is an
//! error naming the file, the field, its value and what is allowed — never a panic deep in a constructor, nor an
//! allocation of a terabyte. Every config type the crate reads implements [`Validate`]; [`checked`] adds the file.
use anyhow::{anyhow, Result};
use std::fmt::Display;
use std::path::Path;

/// Largest channel count, width or vocabulary any config may ask for (SD 1.5's largest is 49 408 tokens, 3072 wide).
pub const MAX_WIDTH: i64 = 1 << 17;
/// Largest number of levels, blocks per level or layers.
pub const MAX_DEPTH: usize = 64;

/// A config that can say what is wrong with it.
pub trait Validate {
    /// `Err("`field` is VALUE: what is allowed")` for the first field that is out of range or does not fit.
    fn validate(&self) -> std::result::Result<(), String>;
}

/// `config` if it is valid, else an error naming `source` (the file it was read from) and the field.
pub fn checked<T: Validate>(config: T, source: &Path) -> Result<T> {
    config.validate().map_err(|e| {
        anyhow!("{}: {e}; fix the file or make it again with the lesson that writes it", source.display())
    })?;
    Ok(config)
}

/// `field` must lie in `lo..=hi`.
pub fn in_range<T: PartialOrd + Display>(field: &str, value: T, lo: T, hi: T) -> std::result::Result<(), String> {
    if value < lo || value > hi {
        return Err(format!("`{field}` is {value}: it must lie in {lo}..={hi}"));
    }
    Ok(())
}

/// `field` must be a finite number in `lo..=hi`.
pub fn finite_in(field: &str, value: f64, lo: f64, hi: f64) -> std::result::Result<(), String> {
    if !value.is_finite() || value < lo || value > hi {
        return Err(format!("`{field}` is {value}: it must be a finite number in [{lo}, {hi}]"));
    }
    Ok(())
}

/// `what` (the value of `field`) must be divisible by `by` (named `by_field`), which must be at least 1.
pub fn divides(field: &str, value: i64, by_field: &str, by: i64) -> std::result::Result<(), String> {
    in_range(by_field, by, 1, MAX_WIDTH)?;
    if value % by != 0 {
        return Err(format!("`{field}` is {value}: it must be a multiple of `{by_field}` = {by}"));
    }
    Ok(())
}

/// Every entry of the list `field` in `lo..=hi`, and the list of length `len` (when given) and not empty.
pub fn list_in(field: &str, values: &[i64], len: Option<usize>, lo: i64, hi: i64) -> std::result::Result<(), String> {
    if values.is_empty() || values.len() > MAX_DEPTH {
        return Err(format!("`{field}` has {} entries: it must have 1 to {MAX_DEPTH}", values.len()));
    }
    if let Some(n) = len.filter(|n| *n != values.len()) {
        return Err(format!("`{field}` has {} entries: it must have {n}, one per level", values.len()));
    }
    values.iter().enumerate().try_for_each(|(i, v)| in_range(&format!("{field}[{i}]"), *v, lo, hi))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Two(i64, i64);
    impl Validate for Two {
        fn validate(&self) -> std::result::Result<(), String> {
            in_range("a", self.0, 1, 8)?;
            divides("a", self.0, "b", self.1)
        }
    }

    #[test]
    fn errors_name_the_file_the_field_the_value_and_what_is_allowed() {
        let path = Path::new("dir/unet.json");
        assert!(checked(Two(4, 2), path).is_ok());
        let e = checked(Two(9, 1), path).err().unwrap().to_string();
        assert!(e.starts_with("dir/unet.json: `a` is 9: it must lie in 1..=8"), "{e}");
        let e = checked(Two(3, 2), path).err().unwrap().to_string();
        assert!(e.contains("`a` is 3: it must be a multiple of `b` = 2"), "{e}");
        let e = checked(Two(4, 0), path).err().unwrap().to_string();
        assert!(e.contains("`b` is 0"), "{e}");
        assert!(finite_in("eps", f64::NAN, 0.0, 1.0).unwrap_err().contains("finite"));
        assert!(list_in("c", &[], None, 1, 4).unwrap_err().contains("1 to"));
        assert!(list_in("c", &[1, 2], Some(3), 1, 4).unwrap_err().contains("one per level"));
        assert!(list_in("c", &[1, 9], None, 1, 4).unwrap_err().contains("`c[1]` is 9"));
    }
}
