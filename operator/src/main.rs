fn main() {
    match rtable_operator::crd::crd_yaml() {
        Ok(y) => print!("{y}"),
        Err(e) => {
            eprintln!("cannot render the CRD: {e}");
            std::process::exit(1);
        }
    }
}
