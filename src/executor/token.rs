//! Per-build tokens: random, kept in the build Pod's token Secret.

use std::io::Read;

/// Key of the token in a token Secret.
pub const TOKEN_KEY: &str = "token";
/// Key of the executor CA certificate in a token Secret.
pub const CA_KEY: &str = "ca.crt";

/// 32 random bytes from the kernel, hex-encoded.
pub fn generate() -> std::io::Result<String> {
    let mut buf = [0u8; 32];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_are_long_and_distinct() {
        let a = super::generate().unwrap();
        let b = super::generate().unwrap();
        assert_eq!(a.len(), 64);
        assert_ne!(a, b);
    }
}
