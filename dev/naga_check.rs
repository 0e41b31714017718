fn main() {
    let path = std::env::args().nth(1).unwrap();
    let src = cvt_gpu::texread::prelude(cvt_gpu::texread::TexRead::Storage, false, false, false) + &std::fs::read_to_string(&path).unwrap();
    let m = match naga::front::wgsl::parse_str(&src) {
        Ok(m) => m,
        Err(e) => {
            println!("{}", e.emit_to_string(&src));
            return;
        }
    };
    match naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all()).validate(&m) {
        Ok(_) => println!("ok"),
        Err(e) => println!("{}", e.emit_to_string(&src)),
    }
}
