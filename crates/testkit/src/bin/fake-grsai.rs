//! The fake Grsai as a standalone server, for benchmarks: answers every create at once.
//! Prints its base URL on stdout, then serves until killed.

#[actix_web::main]
async fn main() {
    let grsai = credit_testkit::fake_grsai::FakeGrsai::start_without_recording().await;
    println!("{}", grsai.base_url());
    let _ = tokio::signal::ctrl_c().await;
}
